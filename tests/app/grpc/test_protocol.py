"""``app/grpc/inference.proto`` is the protocol's own: every message, field and method it defines has the
name, number and type that tritonclient's copy of the protocol gives it, so the bytes on the wire mean the
same to both. Both sets of generated modules live in one process here (ours in a descriptor pool of its own)."""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor
from tritonclient.grpc import model_config_pb2, service_pb2

from app.grpc import inference_pb2


def fields(message: Descriptor) -> dict[str, tuple[int, int, bool, str]]:
    """Each field's number, wire type, repetition and message or enum type; nested messages included."""
    found = {}
    for field in message.fields:
        kind = field.message_type or field.enum_type
        found[field.name] = (field.number, field.type, field.is_repeated, kind.full_name if kind else "")
    for nested in message.nested_types:
        found |= {f"{nested.name}.{name}": value for name, value in fields(nested).items()}
    return found


def tritons(name: str) -> Descriptor:
    for module in (service_pb2, model_config_pb2):
        if name in module.DESCRIPTOR.message_types_by_name:
            return module.DESCRIPTOR.message_types_by_name[name]
    raise AssertionError(f"tritonclient has no message {name}")


def test_every_message_matches_tritonclients_field_for_field():
    ours = inference_pb2.DESCRIPTOR.message_types_by_name
    assert {"ModelInferRequest", "ModelInferResponse", "ModelConfig"} <= set(ours)
    for name, message in ours.items():
        assert message.full_name == f"inference.{name}"
        theirs = fields(tritons(name))
        for field, value in fields(message).items():
            assert theirs.get(field) == value, f"{name}.{field}: ours {value}, tritonclient's {theirs.get(field)}"


def test_the_service_has_the_protocols_name_and_method_signatures():
    ours = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    for method in ours.methods:
        other = theirs.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (other.input_type.full_name,
                                                                              other.output_type.full_name)


def test_the_enums_values_match():
    for name, enum in inference_pb2.DESCRIPTOR.enum_types_by_name.items():
        theirs = model_config_pb2.DESCRIPTOR.enum_types_by_name[name]
        assert {value.name: value.number for value in enum.values} == {value.name: value.number
                                                                       for value in theirs.values}
