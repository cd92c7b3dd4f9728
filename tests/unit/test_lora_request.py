"""LoRARequest as vLLM's: its fields, defaults, properties and equality."""
import pickle

import pytest

from pagedllm import LoRARequest


def test_vllms_fields_and_properties():
    """vLLM's LoRARequest takes base_model_name and is_3d_lora_weight (a TypeError here before) and has adapter_id,
    name and path."""
    req = LoRARequest("sql", 3, "/adapters/sql", base_model_name="base", is_3d_lora_weight=False)
    assert (req.adapter_id, req.name, req.path, req.base_model_name) == (3, "sql", "/adapters/sql", "base")
    assert LoRARequest(lora_name="a", lora_int_id=1, lora_path="/p").base_model_name is None
    assert pickle.loads(pickle.dumps(req)).base_model_name == "base"   # it crosses to the engine core process


def test_equality_and_hash_by_name_as_vllms():
    a, b = LoRARequest("a", 1, "/p"), LoRARequest("a", 2, "/q")
    assert a == b and len({a, b}) == 1 and a != LoRARequest("b", 1, "/p")


@pytest.mark.parametrize("kw, match", [
    (dict(lora_name="a", lora_int_id=1), "lora_path"),
    (dict(lora_name="a", lora_int_id=1, lora_path=""), "lora_path"),
    (dict(lora_name="a", lora_int_id=0, lora_path="/p"), "lora_int_id"),
    (dict(lora_name="a", lora_int_id=1, lora_path="/p", tensorizer_config_dict={"tensorizer_dir": "/t"}),
     "tensorizer_config_dict"),
])
def test_refusals_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        LoRARequest(**kw)
