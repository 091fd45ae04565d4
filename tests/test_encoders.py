"""Tests for mochi_retrieval.encoders: contract, registry, ResNet, text, heads, momentum."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torchvision
from torch import Tensor, nn

from mochi_retrieval.encoders import (
    EncoderCheckError,
    EncoderWithHead,
    HFTextEncoder,
    ProjectionHead,
    ResNetEncoder,
    UnknownEncoderError,
    check_encoder,
    cosine_momentum,
    create_encoder,
    encoder_output_dim,
    list_encoders,
    make_momentum_copy,
    mean_pool,
    momentum_update,
    register_encoder,
)
from mochi_retrieval.encoders import registry as registry_mod

SENTENCES = ["the cat sat on the mat", "a big red dog ran fast", "fish swam"]


# --------------------------------------------------------------------------- contract

def _images(c: int, size: int = 32, b: int = 2) -> Callable[[], Tensor]:
    return lambda: torch.randn(b, c, size, size, generator=torch.Generator().manual_seed(0))


# name -> list of (case id, kwargs factory given the tiny text dir, batch factory given the encoder)
CONTRACT_CASES: dict[str, list[tuple[str, Callable[[Path], dict[str, Any]], Callable[[nn.Module], Any]]]] = {
    "resnet18": [
        ("small_grey", lambda d: {"in_channels": 1, "small_images": True}, lambda e: _images(1)()),
        ("small_rgb", lambda d: {"small_images": True}, lambda e: _images(3)()),
        ("half_stem_grey", lambda d: {"in_channels": 1, "stem": "half"}, lambda e: _images(1, 28)()),
    ],
    "resnet34": [("tiny", lambda d: {}, lambda e: _images(3)())],
    "resnet50": [("tiny", lambda d: {}, lambda e: _images(3)())],
    "hf_text": [
        ("mean", lambda d: {"model_path": d}, lambda e: e.tokenize(SENTENCES)),
        ("cls_ckpt", lambda d: {"model_path": d, "pooling": "cls", "gradient_checkpointing": True},
         lambda e: e.tokenize(SENTENCES)),
    ],
}
BUILTIN_NAMES = list_encoders()  # at collection time, before any test registers more


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_every_registered_encoder_has_a_contract_case(name: str) -> None:
    assert name in CONTRACT_CASES, f"add a contract case for registered encoder {name!r}"


@pytest.mark.parametrize(
    "name,case",
    [(n, i) for n in BUILTIN_NAMES for i in range(len(CONTRACT_CASES.get(n, [])))],
    ids=lambda v: v if isinstance(v, str) else str(v),
)
def test_encoder_contract(name: str, case: int, tiny_text_model_dir: Path) -> None:
    _, make_kwargs, make_batch = CONTRACT_CASES[name][case]
    torch.manual_seed(0)
    encoder = create_encoder(name, **make_kwargs(tiny_text_model_dir))
    expected = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "hf_text": 32}.get(name)
    check_encoder(encoder, make_batch(encoder), expected_dim=expected)


def test_resnet_output_dims_and_bad_arch() -> None:
    assert ResNetEncoder("resnet18", in_channels=1).output_dim == 512
    with pytest.raises(ValueError, match=r"resnet99.*resnet18, resnet34, resnet50"):
        ResNetEncoder("resnet99")


@pytest.mark.parametrize("stem, side", [("imagenet", 7), ("half", 14), ("small", 28)])
def test_resnet_stem_sets_the_first_stage_resolution(stem: str, side: int) -> None:
    enc = ResNetEncoder("resnet18", in_channels=1, width=8, stem=stem).eval()
    b = enc.backbone
    with torch.no_grad():
        x = b.maxpool(b.relu(b.bn1(b.conv1(torch.randn(2, 1, 28, 28)))))
    assert x.shape[-2:] == (side, side)
    assert enc(torch.randn(2, 1, 28, 28)).shape == (2, 64)


def test_resnet_stem_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown stem 'tiny'; choices: imagenet, small, half"):
        ResNetEncoder("resnet18", stem="tiny")
    with pytest.raises(ValueError, match="contradicts stem='half'"):
        ResNetEncoder("resnet18", small_images=True, stem="half")


def test_check_encoder_leaves_mode_grads_and_buffers_alone() -> None:
    enc = ResNetEncoder("resnet18", small_images=True).eval()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    check_encoder(enc, torch.randn(2, 3, 16, 16), expected_dim=512)
    assert not enc.training
    assert all(p.grad is None for p in enc.parameters())
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())


# --------------------------------------------------------------------------- check_encoder failures

class _Toy(nn.Module):
    """Linear encoder (B, 4) -> (B, 3) with switchable faults."""

    def __init__(self, fault: str = "") -> None:
        super().__init__()
        self.fault = fault
        self.lin = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)
        if fault != "unused":
            self.unused.requires_grad_(False)
        self.output_dim = 5 if fault == "dim" else 3

    def forward(self, batch: Tensor) -> Tensor:
        out = self.lin(batch)
        if self.fault == "rank":
            return out.unsqueeze(1)
        if self.fault == "nan":
            return out * torch.tensor(float("nan"))
        return out


@pytest.mark.parametrize(
    "fault,message",
    [
        ("rank", r"rank 3"),
        ("dim", r"\(2, 3\) != \(batch_size, output_dim\) = \(2, 5\)"),
        ("nan", r"NaN"),
        ("unused", r"no gradient: unused\.weight, unused\.bias"),
    ],
)
def test_check_encoder_catches(fault: str, message: str) -> None:
    check_encoder(_Toy(), torch.randn(2, 4))  # the healthy toy passes
    with pytest.raises(EncoderCheckError, match=message):
        check_encoder(_Toy(fault), torch.randn(2, 4))


def test_check_encoder_expected_dim_and_missing_output_dim() -> None:
    with pytest.raises(EncoderCheckError, match="expected_dim is 7"):
        check_encoder(_Toy(), torch.randn(2, 4), expected_dim=7)
    with pytest.raises(EncoderCheckError, match="output_dim"):
        check_encoder(nn.Linear(4, 3), torch.randn(2, 4))
    with pytest.raises(TypeError, match="Linear does not expose `output_dim`"):
        encoder_output_dim(nn.Linear(4, 3))


# --------------------------------------------------------------------------- registry

@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_mod, "_REGISTRY", dict(registry_mod._REGISTRY))


def test_registry_user_encoder(isolated_registry: None) -> None:
    @register_encoder("user_mlp")
    class UserMLP(nn.Module):
        def __init__(self, in_dim: int = 4, out_dim: int = 6) -> None:
            super().__init__()
            self.lin = nn.Linear(in_dim, out_dim)
            self.output_dim = out_dim

        def forward(self, batch: Tensor) -> Tensor:
            return self.lin(batch)

    register_encoder("user_fn", lambda **kw: UserMLP(**kw))
    assert {"user_mlp", "user_fn", "resnet50", "hf_text"} <= set(list_encoders())
    enc = create_encoder("user_mlp", out_dim=8)
    assert isinstance(enc, UserMLP) and enc.output_dim == 8
    check_encoder(create_encoder("user_fn", in_dim=3), torch.randn(2, 3), expected_dim=6)


def test_registry_errors(isolated_registry: None) -> None:
    with pytest.raises(UnknownEncoderError, match=r"'resnet5'.*Did you mean 'resnet50'") as info:
        create_encoder("resnet5")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match=r"'resnet18' is already registered.*override=True"):
        register_encoder("resnet18", nn.Identity)
    register_encoder("resnet18", nn.Identity, override=True)
    with pytest.raises(TypeError, match="output_dim"):  # Identity breaks the contract
        create_encoder("resnet18")


# --------------------------------------------------------------------------- resnet

def test_resnet_backbone_loads_into_torchvision_resnet50() -> None:
    enc = ResNetEncoder("resnet50")
    target = torchvision.models.resnet50(weights=None)
    result = target.load_state_dict(enc.backbone.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    assert torch.equal(target.layer4[2].conv3.weight, enc.backbone.layer4[2].conv3.weight)


# --------------------------------------------------------------------------- text

def test_text_mean_pooling_matches_hand_written(tiny_text_model_dir: Path) -> None:
    enc = HFTextEncoder(tiny_text_model_dir).eval()
    batch = enc.tokenize(SENTENCES)
    assert enc.output_dim == 32 and batch["attention_mask"].sum(1).tolist() == [8, 8, 4]
    with torch.no_grad():
        hidden = enc.model(**batch).last_hidden_state  # (B, L, H)
        mask = batch["attention_mask"]
        manual = torch.stack([hidden[i, mask[i].bool()].mean(0) for i in range(len(SENTENCES))])
        torch.testing.assert_close(enc(batch), manual)
        torch.testing.assert_close(mean_pool(hidden, mask), manual)


def test_text_cls_pooling_picks_token_zero(tiny_text_model_dir: Path) -> None:
    enc = HFTextEncoder(tiny_text_model_dir, pooling="cls").eval()
    batch = enc.tokenize(SENTENCES)
    with torch.no_grad():
        torch.testing.assert_close(enc(batch), enc.model(**batch).last_hidden_state[:, 0])


def test_text_padding_does_not_change_embedding(tiny_text_model_dir: Path) -> None:
    enc = HFTextEncoder(tiny_text_model_dir).eval()
    with torch.no_grad():
        alone = enc(enc.tokenize(["fish swam"]))
        padded = enc.tokenize(["fish swam", "the quick brown fox jumps over the lazy dog"])
        assert padded["attention_mask"][0].sum() < padded["attention_mask"].shape[1]
        torch.testing.assert_close(enc(padded)[:1], alone, atol=1e-5, rtol=1e-5)


def test_text_truncation_and_bad_pooling(tiny_text_model_dir: Path) -> None:
    enc = HFTextEncoder(tiny_text_model_dir, max_length=4)
    assert enc.tokenize(SENTENCES)["input_ids"].shape == (3, 4)
    model = HFTextEncoder(tiny_text_model_dir, gradient_checkpointing=True).model
    flag = "is_activation_checkpointing"
    if not hasattr(model, flag):
        flag = "is_gradient_checkpointing"
    assert getattr(model, flag)
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        HFTextEncoder(tiny_text_model_dir, pooling="max")


def test_text_save_reload_and_from_model(tiny_text_model_dir: Path, tmp_path: Path) -> None:
    enc = HFTextEncoder(tiny_text_model_dir).eval()
    with torch.no_grad():
        enc.model.embeddings.word_embeddings.weight.add_(0.5)  # differ from the fixture
        batch = enc.tokenize(SENTENCES)
        expected = enc(batch)
        enc.save(tmp_path / "saved")
        torch.testing.assert_close(HFTextEncoder(tmp_path / "saved").eval()(batch), expected)
        wrapped = HFTextEncoder.from_model(enc.model, enc.tokenizer)
        torch.testing.assert_close(wrapped(wrapped.tokenize(SENTENCES)), expected)
        key_encoder = make_momentum_copy(enc)
        torch.testing.assert_close(key_encoder(batch), expected)


def test_text_non_model_folder_errors(tmp_path: Path, tiny_text_model_dir: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match=rf"{tmp_path.name}.*config\.json is missing"):
        HFTextEncoder(tmp_path)
    with pytest.raises(ValueError, match="is not a directory"):
        HFTextEncoder(tmp_path / "nowhere")
    for f in tiny_text_model_dir.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValueError, match="could not load model weights"):
        HFTextEncoder(tiny_text_model_dir)
    for f in tiny_text_model_dir.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(ValueError, match="has no tokenizer files"):
        HFTextEncoder(tiny_text_model_dir)


# --------------------------------------------------------------------------- heads and momentum

def test_projection_head_and_encoder_with_head() -> None:
    head = ProjectionHead(512, hidden_dim=64, out_dim=16, batch_norm=True)
    assert [type(m) for m in head.net] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    model = EncoderWithHead(ResNetEncoder("resnet18", small_images=True), head)
    assert model.output_dim == 16
    check_encoder(model, torch.randn(2, 3, 16, 16), expected_dim=16)
    assert len(ProjectionHead(8, num_layers=1).net) == 1
    with pytest.raises(ValueError, match="in_dim=8 but the encoder's output_dim is 512"):
        EncoderWithHead(model.encoder, ProjectionHead(8))


def _bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


@pytest.mark.parametrize("m", [0.0, 1.0, 0.9])
def test_momentum_update_closed_form(m: float) -> None:
    online, target = _bn_net(0), _bn_net(1)
    online.train()(torch.randn(8, 3))  # move online's BN running stats
    old_t = [p.clone() for p in target.parameters()]
    momentum_update(online, target, m)
    for t, o, t0 in zip(target.parameters(), online.parameters(), old_t):
        if m == 0.0:
            assert torch.equal(t, o)
        elif m == 1.0:
            assert torch.equal(t, t0)
        else:
            torch.testing.assert_close(t, m * t0 + (1 - m) * o)
    for (name, tb), ob in zip(target.named_buffers(), online.buffers()):
        assert torch.equal(tb, ob), name


def test_momentum_copy_and_errors() -> None:
    online = _bn_net(0)
    target = make_momentum_copy(online)
    assert not any(p.requires_grad for p in target.parameters())
    assert all(p.requires_grad for p in online.parameters())
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        momentum_update(online, target, 1.5)
    with pytest.raises(ValueError,
                       match=r"parameter mismatch: online '2.weight' \(2, 4\) vs target '2.weight' \(3, 4\)"):
        momentum_update(online, nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)), 0.5)
    with pytest.raises(ValueError, match="online has 6 parameters but target has 4"):
        momentum_update(online, nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), 0.5)


def test_cosine_momentum() -> None:
    assert cosine_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 100, 100) == pytest.approx(1.0)
    assert cosine_momentum(0.99, 50, 100) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 500, 100) == pytest.approx(1.0)
    assert math.isclose(cosine_momentum(0.996, 25, 100), 1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)
