"""Precision (autocast, scaling, clipping, the optimiser step) and device resolution."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cmhash.config.schema import parse_params
from cmhash.errors import ConfigError
from cmhash.runtime.device import resolve_device
from cmhash.runtime.precision import DTYPES, Precision

CPU = torch.device("cpu")


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def batch(device: torch.device = CPU) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=generator).to(device), torch.randn(8, 3, generator=generator).to(device)


def loss_of(model: nn.Module, device: torch.device = CPU) -> torch.Tensor:
    x, y = batch(device)
    return nn.functional.mse_loss(model(x).float(), y)


def gradient(model: nn.Module) -> torch.Tensor:
    """The flattened gradient of the loss, computed on a copy so the model is untouched."""
    clone = copy.deepcopy(model)
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss_of(clone), list(clone.parameters()))])


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("clip", [0.0, 0.05, 100.0])
def test_fp32_step_is_identical_to_a_plain_loop(clip: float) -> None:
    ours, plain = tiny_model(), tiny_model()
    ours_opt = torch.optim.Adam(ours.parameters(), lr=1e-2, betas=(0.5, 0.999))
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-2, betas=(0.5, 0.999))
    precision = Precision("fp32", CPU)

    with precision.autocast():
        loss = loss_of(ours)
    precision.backward_step(loss, ours_opt, ours.parameters(), clip)

    loss_of(plain).backward()
    if clip > 0:
        nn.utils.clip_grad_norm_(plain.parameters(), clip)
    plain_opt.step()

    assert torch.equal(flat(ours), flat(plain))
    assert not torch.equal(flat(ours), flat(tiny_model()))  # it did step
    assert all(p.grad is None for p in ours.parameters())  # zero_grad(set_to_none=True)


@pytest.mark.parametrize("fraction", [0.25, 4.0])  # clip at a quarter of / four times the gradient norm
def test_clipping_caps_the_update_and_returns_the_pre_clip_norm(fraction: float) -> None:
    model = tiny_model()
    grad = gradient(model)
    norm = torch.linalg.vector_norm(grad).item()
    max_norm = fraction * norm
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # update = -(clipped gradient)
    before = flat(model)

    returned = Precision("fp32", CPU).backward_step(loss_of(model), optimizer, model.parameters(), max_norm)

    applied = before - flat(model)
    assert returned.item() == pytest.approx(norm, rel=1e-5)
    assert torch.linalg.vector_norm(applied).item() <= max_norm + 1e-6
    assert torch.allclose(applied, grad * min(1.0, fraction), rtol=1e-4, atol=1e-7)


def test_without_clipping_the_norm_is_still_returned() -> None:
    model = tiny_model()
    expected = torch.linalg.vector_norm(gradient(model)).item()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    returned = Precision("fp32", CPU).backward_step(loss_of(model), optimizer, model.parameters(), 0.0)
    assert returned.item() == pytest.approx(expected, rel=1e-5)


def test_bf16_on_cpu_autocasts_and_trains() -> None:
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    precision = Precision("bf16", CPU)
    x, _ = batch()
    with precision.autocast():
        assert model(x).dtype == torch.bfloat16
        loss = loss_of(model)
    before = flat(model)
    norm = precision.backward_step(loss, optimizer, model.parameters(), 1.0)
    assert torch.isfinite(loss) and torch.isfinite(norm) and norm > 0
    assert torch.isfinite(flat(model)).all() and not torch.equal(before, flat(model))
    assert not precision.scaler.is_enabled()


def test_fp32_autocast_leaves_dtypes_alone() -> None:
    x, _ = batch()
    with Precision("fp32", CPU).autocast():
        assert tiny_model()(x).dtype == torch.float32


def test_fp16_on_cpu_is_refused() -> None:
    with pytest.raises(ConfigError, match="^precision fp16 needs a CUDA device; use fp32 or bf16 on CPU$"):
        Precision("fp16", CPU)


@pytest.mark.parametrize(("section", "allowed"), [("train", list(DTYPES)), ("clip", ["auto", *DTYPES])])
def test_unknown_precision_lists_valid_ones(section: str, allowed: list[str]) -> None:
    # refused when params.yaml is read, naming the key and every valid name
    with pytest.raises(ConfigError) as err:
        parse_params({section: {"precision": "fp8"}})
    message = str(err.value)
    assert f"{section}.precision = 'fp8'" in message and "\n" not in message
    assert all(f"'{name}'" in message for name in allowed)


def scaling(init_scale: float = 2.0**16) -> Precision:
    """A Precision whose loss scaler is on, on the CPU (fp16 itself needs CUDA; the scaler does not)."""
    precision = Precision("fp32", CPU)
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return precision


def test_an_overflowing_step_is_skipped_and_halves_the_scale() -> None:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    precision, before = scaling(), flat(model)
    norm = precision.backward_step(loss_of(model) * float("inf"), optimizer, model.parameters(), 1.0)
    assert not torch.isfinite(norm)
    assert torch.equal(flat(model), before)  # skipped
    assert precision.scaler.get_scale() == 2.0**15


def test_scaler_state_is_saved_and_loaded_back() -> None:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trained = scaling()
    trained.backward_step(loss_of(model) * float("inf"), optimizer, model.parameters(), 0.0)  # overflow: scale halved
    trained.backward_step(loss_of(model), optimizer, model.parameters(), 0.0)  # a good step: growth tracker 1
    assert trained.scaler.get_scale() == 2.0**15 != scaling().scaler.get_scale()
    resumed = scaling()
    resumed.load_state_dict(trained.state_dict())
    assert resumed.scaler.get_scale() == 2.0**15
    assert resumed.state_dict() == trained.state_dict() != scaling().state_dict()


def test_empty_scaler_state_keeps_the_fresh_scaler() -> None:
    # resumed in fp16 from a checkpoint written in fp32: its scaler state is {}
    assert Precision("fp32", CPU).state_dict() == {}
    resumed = scaling(init_scale=1024.0)
    resumed.load_state_dict({})
    assert resumed.scaler.is_enabled() and resumed.scaler.get_scale() == 1024.0


def test_bf16_on_a_gpu_without_bf16_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    with pytest.raises(ConfigError, match="bf16"):
        Precision("bf16", torch.device("cuda"))


def test_resolve_device_without_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    assert resolve_device("cpu") == CPU
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError) as err:
            resolve_device(name)
        assert str(err.value) == f"device '{name}' requested but CUDA is not available; use device: auto or cpu"


def test_resolve_device_with_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == CPU
    with pytest.raises(ConfigError, match="only 2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:", "cuda:x", "mps", ""])
def test_resolve_device_rejects_other_names(name: str) -> None:
    with pytest.raises(ConfigError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device(name)


@pytest.mark.cuda
def test_fp16_on_cuda_scales_steps_and_resumes_its_scaler() -> None:
    cuda = torch.device("cuda")
    model = tiny_model().to(cuda)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    precision = Precision("fp16", cuda)
    before = flat(model)
    with precision.autocast():
        x, _ = batch(cuda)
        assert model(x).dtype == torch.float16
        loss = loss_of(model, cuda)
    norm = precision.backward_step(loss, optimizer, model.parameters(), 1.0)
    assert torch.isfinite(loss) and torch.isfinite(norm)
    assert not torch.equal(before, flat(model))

    # An overflowing step halves the scale: a state a fresh scaler does not have, so a resumed one must take it over.
    precision.backward_step(loss_of(model, cuda) * float("inf"), optimizer, model.parameters(), 1.0)
    assert precision.scaler.get_scale() != Precision("fp16", cuda).scaler.get_scale()
    resumed = Precision("fp16", cuda)
    resumed.load_state_dict(precision.state_dict())
    assert resumed.scaler.get_scale() == precision.scaler.get_scale()
    assert resumed.state_dict() == precision.state_dict()
    fresh = Precision("fp16", cuda)
    fresh.load_state_dict(Precision("fp32", cuda).state_dict())  # resumed from an fp32 checkpoint
    assert fresh.scaler.is_enabled()
