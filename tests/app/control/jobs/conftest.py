import pytest


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """APP_DATABASE_URL for each store: unset (SQLite in the state directory), then a fresh database on the test
    session's PostgreSQL server (tests/support/postgres.py)."""
    return request.getfixturevalue("postgres_url") if request.param == "postgres" else None
