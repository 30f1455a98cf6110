"""The model zoo: every registered model builds for its tasks, trains a step dense and 2:4
sparse, and rejects bad names, tasks, options and shapes with one-line ValueErrors.

Registry-driven: a newly registered model is covered automatically, built with its
``smoke_options``. Models marked ``large`` are only built on the meta device.
"""

from __future__ import annotations

import sys
import textwrap
import uuid

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.app.models import (
    TASKS,
    ModelInfo,
    create_model,
    gpt_param_count,
    list_models,
    register_model,
)

MODELS = list_models()
SMALL = [info for info in MODELS.values() if not info.large]
LARGE = [info for info in MODELS.values() if info.large]

# Classification inputs: digits flat and as an image, MNIST, CIFAR. Every classification
# model must take images; a model may refuse the others, but only with a ValueError.
CLASSIFICATION_SHAPES = [(64,), (1, 8, 8), (1, 28, 28), (3, 32, 32)]
REQUIRED_SHAPES = {(1, 28, 28), (3, 32, 32)}
LM_SHAPES = [(16,), (7,)]
NUM_CLASSES = {"classification": 10, "language_model": 256}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The smoke models are tiny: extra intra-op threads only add synchronisation, and on a
    # busy machine their spin-waits cost seconds per test.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cases(models: list[ModelInfo]) -> list:
    cases = []
    for info in models:
        for task in info.tasks:
            shapes = CLASSIFICATION_SHAPES if task == "classification" else LM_SHAPES
            for shape in shapes:
                cases.append(pytest.param(info, task, shape,
                                          id=f"{info.name}-{task}-{'x'.join(map(str, shape))}"))
    return cases


def _batch(task: str, shape: tuple[int, ...], batch: int = 2) -> torch.Tensor:
    if task == "language_model":
        return torch.randint(0, NUM_CLASSES[task], (batch, *shape))
    return torch.randn(batch, *shape)


def _expected_output(task: str, shape: tuple[int, ...], batch: int = 2) -> tuple[int, ...]:
    if task == "language_model":
        return (batch, shape[0], NUM_CLASSES[task])
    return (batch, NUM_CLASSES[task])


def _build(info: ModelInfo, task: str, shape: tuple[int, ...], **options) -> nn.Module:
    return create_model(info.name, input_shape=shape, num_classes=NUM_CLASSES[task], task=task,
                        **{**info.smoke_options, **options})


def _assert_one_line(error: pytest.ExceptionInfo) -> None:
    message = str(error.value)
    assert message and "\n" not in message


def _loss(output: torch.Tensor, task: str) -> torch.Tensor:
    if task == "language_model":
        target = torch.randint(0, NUM_CLASSES[task], output.shape[:-1])
        return nn.functional.cross_entropy(output.flatten(0, 1), target.flatten())
    return nn.functional.cross_entropy(output, torch.randint(0, NUM_CLASSES[task],
                                                             output.shape[:1]))


def test_registry_lists_the_expected_models():
    expected = {"mlp", "resnet20", "resnet32", "resnet56", "resnet18", "resnet34", "resnet50",
                "vit_tiny", "gpt_tiny", "gpt_1b"}
    assert expected <= set(MODELS)
    for name, info in MODELS.items():
        assert info.name == name and info.description and set(info.tasks) <= set(TASKS)
        assert set(info.smoke_options) <= set(info.options)
    assert MODELS["gpt_1b"].large and not MODELS["gpt_tiny"].large


@pytest.mark.parametrize(("info", "task", "shape"), _cases(SMALL))
def test_forward_backward_and_sparse_step(info: ModelInfo, task: str, shape: tuple[int, ...]):
    try:
        model = _build(info, task, shape)
    except ValueError as error:
        assert shape not in REQUIRED_SHAPES, f"{info.name} must take {shape}: {error}"
        assert "\n" not in str(error) and str(error)
        return
    x = _batch(task, shape)
    out = model(x)
    assert out.shape == _expected_output(task, shape)
    _loss(out, task).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)

    # The same model made 2:4 sparse still trains: forward, backward, an SGD step.
    model.zero_grad()
    handle = nmsparse.sparsify(model, "2:4")
    assert handle.sparse_layers
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    out = model(x)
    assert out.shape == _expected_output(task, shape)
    _loss(out, task).backward()
    optimizer.step()
    assert torch.isfinite(model(x)).all()
    assert nmsparse.check(model, "2:4").ok


@pytest.mark.parametrize("info", LARGE, ids=lambda info: info.name)
def test_large_models_build_on_the_meta_device(info: ModelInfo):
    task = info.tasks[0]
    shape = (1024,) if task == "language_model" else (3, 224, 224)
    with torch.device("meta"):
        model = create_model(info.name, input_shape=shape, num_classes=NUM_CLASSES[task],
                             task=task)
        out = model(_batch(task, shape[:1] if task == "language_model" else shape))
    assert out.shape == _expected_output(task, shape)
    assert all(p.is_meta for p in model.parameters())


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "expected"), [
    ("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032)])
def test_imagenet_resnet_parameter_counts_match_the_reference(name: str, expected: int):
    with torch.device("meta"):
        model = create_model(name, input_shape=(3, 224, 224), num_classes=1000)
    assert _count(model) == expected


def test_cifar_resnet20_parameter_count():
    # 269,722 with the paper's option-A shortcuts, plus two 1x1 conv + BN projections:
    # (16*32 + 2*32) + (32*64 + 2*64) = 2,752.
    model = create_model("resnet20", input_shape=(3, 32, 32), num_classes=10)
    assert _count(model) == 269_722 + 2_752


def test_gpt_param_count_matches_the_built_models():
    model = create_model("gpt_tiny", input_shape=(64,), num_classes=256, task="language_model",
                         n_layer=2, d_model=32, n_head=2)
    assert _count(model) == gpt_param_count(n_layer=2, d_model=32, max_seq_len=64)
    tied = create_model("gpt_tiny", input_shape=(64,), num_classes=256, task="language_model",
                        n_layer=2, d_model=32, n_head=2, tie_weights=True)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert _count(tied) == gpt_param_count(n_layer=2, d_model=32, max_seq_len=64,
                                           tie_weights=True)
    with torch.device("meta"):
        big = create_model("gpt_1b", input_shape=(1024,), num_classes=256,
                           task="language_model")
    expected = gpt_param_count(n_layer=24, d_model=2048, max_seq_len=1024)
    assert _count(big) == expected and 1.15e9 < expected < 1.25e9


def test_resnet_stem_rule_and_zero_init_residual():
    small = create_model("resnet18", input_shape=(3, 32, 32), num_classes=10, width=0.25)
    large = create_model("resnet18", input_shape=(3, 64, 64), num_classes=10, width=0.25)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, nn.MaxPool2d)
    forced = create_model("resnet18", input_shape=(3, 32, 32), num_classes=10, width=0.25,
                          stem="imagenet")
    assert forced.conv1.kernel_size == (7, 7)
    assert forced(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    zero = create_model("resnet50", input_shape=(3, 32, 32), num_classes=10, width=0.25,
                        zero_init_residual=True)
    assert all(torch.all(block.bn3.weight == 0) for block in zero.layer1)
    assert torch.all(zero.bn1.weight == 1)


def test_vit_default_patch_size_and_grid():
    for shape, patch in [((3, 32, 32), 4), ((1, 28, 28), 4), ((1, 8, 8), 1),
                         ((3, 224, 224), 28), ((3, 64, 48), 8)]:
        model = create_model("vit_tiny", input_shape=shape, num_classes=10, dim=32, heads=2,
                             depth=1)
        assert model.patch_embed.kernel_size == (patch, patch), shape
    model = create_model("vit_tiny", input_shape=(3, 32, 32), num_classes=10, dim=32, heads=2,
                         depth=1, patch_size=8)
    assert model.pos_embed.shape == (1, 4 * 4 + 1, 32)
    assert isinstance(model.blocks[0].attn, nn.MultiheadAttention)


def test_gpt_is_causal():
    model = _build(MODELS["gpt_tiny"], "language_model", (16,)).eval()
    x = torch.randint(0, 256, (1, 16))
    changed = x.clone()
    changed[0, 10] = (x[0, 10] + 1) % 256
    with torch.no_grad():
        before, after = model(x), model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])
    # shorter sequences are fine, longer than input_shape[0] are not
    assert model(x[:, :5]).shape == (1, 5, 256)
    with pytest.raises(ValueError, match="exceeds the model's maximum 16") as error:
        model(torch.randint(0, 256, (1, 17)))
    _assert_one_line(error)


@pytest.mark.parametrize(("name", "kwargs", "match"), [
    ("nope", {}, r"unknown model 'nope'; registered models: .*resnet20"),
    ("resnet20", {"task": "language_model", "input_shape": (16,)},
     r"'resnet20' does not support task 'language_model'.*gpt_tiny"),
    ("gpt_tiny", {"input_shape": (16,)}, r"does not support task 'classification'"),
    ("mlp", {"task": "segmentation"}, r"unknown task 'segmentation'; tasks: classification"),
    ("mlp", {"depth": 3}, r"'mlp' has no option 'depth'; accepted options: hidden, dropout"),
    ("mlp", {"hidden": "256,256"}, r"hidden='256,256' is invalid; expected a tuple/list"),
    ("mlp", {"dropout": 1.5}, r"dropout=1.5 is invalid"),
    ("mlp", {"input_shape": (0, 3)}, r"input_shape must be a non-empty tuple of positive"),
    ("mlp", {"num_classes": 0}, r"num_classes must be a positive int"),
    ("resnet20", {"width": -1.0}, r"width=-1.0 is invalid; expected a positive number"),
    ("resnet20", {"width": True}, r"width=True is invalid"),
    ("resnet18", {"stem": "big"}, r"stem='big' is invalid; expected one of 'auto'"),
    ("resnet20", {"input_shape": (64,)}, r"resnet20 takes images shaped \(C, H, W\)"),
    ("resnet56", {"input_shape": (3, 4, 4)}, r"at least 8x8 pixels, got 4x4"),
    ("vit_tiny", {"patch_size": 5}, r"patch_size=5 does not divide .* 32x32; accepted: 1, 2"),
    ("vit_tiny", {"dim": 32, "heads": 3}, r"dim=32 is not divisible by heads=3"),
    ("gpt_tiny", {"task": "language_model", "input_shape": (2, 8)},
     r"input_shape must be \(seq_len,\)"),
    ("gpt_tiny", {"task": "language_model", "input_shape": (8,), "n_head": 5},
     r"d_model=256 is not divisible by n_head=5"),
])
def test_errors_are_one_line_value_errors(name: str, kwargs: dict, match: str):
    arguments = {"input_shape": (3, 32, 32), "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match) as error:
        create_model(name, **arguments)
    _assert_one_line(error)


USER_MODULE = """
    import torch
    from torch import nn

    def tiny(*, input_shape, num_classes, hidden=8):
        return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], hidden), nn.ReLU(),
                             nn.Linear(hidden, num_classes))

    def flexible(**kwargs):
        module = nn.Linear(4, 2)
        module.seen = kwargs
        return module

    class Builders:
        @staticmethod
        def build(input_shape, num_classes, task):
            return nn.Linear(input_shape[0], num_classes)

    def not_a_module(*, input_shape, num_classes):
        return 42

    def needs_depth(*, input_shape, num_classes, depth):
        return nn.Linear(input_shape[0], depth)

    CONSTANT = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    """A module written to tmp_path and importable by a name unique to this test."""
    name = f"nms_user_models_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    (tmp_path / f"{name}_broken.py").write_text("raise RuntimeError('boom\\nsecond line')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for module in (name, f"{name}_broken"):
        sys.modules.pop(module, None)


def test_user_factory_is_called_with_the_arguments_it_accepts(user_module: str):
    model = create_model(f"{user_module}:tiny", input_shape=(64,), num_classes=3, hidden=4)
    assert model(torch.randn(2, 64)).shape == (2, 3) and model[1].out_features == 4
    flexible = create_model(f"{user_module}:flexible", input_shape=(4,), num_classes=2,
                            anything=1)
    assert flexible.seen == {"input_shape": (4,), "num_classes": 2,
                             "task": "classification", "anything": 1}
    built = create_model(f"{user_module}:Builders.build", input_shape=(5,), num_classes=2,
                         task="language_model")
    assert isinstance(built, nn.Linear) and built.in_features == 5
    nmsparse.sparsify(model, "2:4")  # the user model is an ordinary nn.Module


@pytest.mark.parametrize(("attribute", "options", "match"), [
    ("tiny", {"depth": 2}, r"has no option 'depth'; accepted options: hidden"),
    ("not_a_module", {}, r"returned a int, not a torch.nn.Module"),
    ("needs_depth", {}, r"requires 'depth'"),
    ("missing", {}, r"has no attribute 'missing'"),
    ("CONSTANT", {}, r"'CONSTANT' is a int, not a callable factory"),
])
def test_user_factory_errors(user_module: str, attribute: str, options: dict, match: str):
    with pytest.raises(ValueError, match=match) as error:
        create_model(f"{user_module}:{attribute}", input_shape=(4,), num_classes=2, **options)
    _assert_one_line(error)


def test_user_factory_import_errors_name_the_module_and_reason(user_module: str):
    with pytest.raises(ValueError, match=r"no module 'no_such_module_xyz' on the Python "
                                         r"path; .*PYTHONPATH") as error:
        create_model("no_such_module_xyz:f", input_shape=(4,), num_classes=2)
    _assert_one_line(error)
    with pytest.raises(ValueError, match=rf"cannot import module '{user_module}_broken': "
                                         r"RuntimeError: boom second line") as error:
        create_model(f"{user_module}_broken:f", input_shape=(4,), num_classes=2)
    _assert_one_line(error)
    with pytest.raises(ValueError, match=r"expected 'package.module:factory'"):
        create_model(":f", input_shape=(4,), num_classes=2)


def test_register_model_validates_and_rejects_clashes(monkeypatch):
    from nmsparse.app.models import _registry

    monkeypatch.setattr(_registry, "MODELS", _registry.MODELS.copy())

    @register_model("test_linear", description="a linear layer", tasks=("classification",),
                    smoke_options={"bias": False})
    def test_linear(*, input_shape, num_classes, bias: bool = True) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[-1], num_classes, bias=bias))

    assert list_models()["test_linear"].options == {"bias": True}
    model = create_model("test_linear", input_shape=(8,), num_classes=2, bias=False)
    assert model[1].bias is None
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp", description="x", tasks=("classification",))(test_linear)
    with pytest.raises(ValueError, match="tasks must be a non-empty subset"):
        register_model("other", description="x", tasks=("detection",))
    with pytest.raises(ValueError, match="every option needs a default"):
        register_model("other", description="x", tasks=("classification",))(
            lambda *, input_shape, num_classes, depth: nn.Linear(1, 1))
    with pytest.raises(ValueError, match="must accept the keyword argument 'num_classes'"):
        register_model("other", description="x", tasks=("classification",))(
            lambda *, input_shape: nn.Linear(1, 1))
