import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import make_tiny_vit
from vitslim.models import ModelLoadError, UnsupportedModelError, load_model, vit_parts

TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4, num_classes=10)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("layout", ["safetensors", "pth_plain", "pth_deit", "pth_ddp_prefix"])
def test_load_checkpoint_layouts(tmp_path, layout):
    source = make_tiny_vit()
    state = source.state_dict()
    if layout == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / "w.pth"
        payload = {
            "pth_plain": state,
            "pth_deit": {"model": state, "epoch": 3},
            "pth_ddp_prefix": {f"module.{k}": v for k, v in state.items()},
        }[layout]
        torch.save(payload, path)
    loaded = load_model("vit_tiny_patch16_224", checkpoint=path, **TINY)
    assert _same_weights(loaded, source)
    assert not loaded.training


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": make_tiny_vit().state_dict(), "hook": timm.create_model}, path)
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        load_model("vit_tiny_patch16_224", checkpoint=path, **TINY)


def test_wrong_architecture_names_the_keys(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ModelLoadError, match="missing .*unexpected \\['foo.weight'\\]"):
        load_model("vit_tiny_patch16_224", checkpoint=path, **TINY)


def test_hub_unreachable_says_use_checkpoint(monkeypatch):
    def offline(*args, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to the hub")
        return timm.create_model(*args, **kwargs)

    monkeypatch.setattr("vitslim.models.loading.timm.create_model", offline)
    with pytest.raises(ModelLoadError) as err:
        load_model("deit_tiny_patch16_224")
    message = str(err.value)
    assert "--checkpoint" in message and "unreachable" in message and "\n" not in message


def test_unknown_model_name():
    with pytest.raises(ModelLoadError, match="not a timm model name"):
        load_model("vit_does_not_exist", pretrained=False)


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("vit_tiny_patch16_224", checkpoint=tmp_path / "nope.pth", **TINY)


def test_adapter_exposes_block_parts():
    model = make_tiny_vit()
    parts = vit_parts(model)
    assert len(parts.blocks) == 2 and parts.num_prefix_tokens == 1
    b = parts.blocks[1]
    assert b.qkv is model.blocks[1].attn.qkv and b.fc2 is model.blocks[1].mlp.fc2
    assert b.num_heads == 4
    assert set(parts.linears) == {f"blocks.{i}.{n}" for i in range(2)
                                  for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}


def test_adapter_counts_deit_distillation_token():
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, depth=1)
    assert vit_parts(model).num_prefix_tokens == 2


def test_adapter_names_unsupported_block_types():
    model = make_tiny_vit()
    model.blocks[0] = torch.nn.Identity()
    with pytest.raises(UnsupportedModelError, match="Identity"):
        vit_parts(model)
    with pytest.raises(UnsupportedModelError, match="no `blocks`"):
        vit_parts(torch.nn.Linear(2, 2))
