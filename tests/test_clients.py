"""The real clients: every snippet of docs/frameworks.md executed as written (SB3, timm's registry, the HF
Trainer, Lightning, in_backward with a scheduler), without warnings from this package or about the optimizer;
and each client trained with our class against the same client with its own RMSprop."""

import re
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

import rmsprop_gpu
from tests import released

DOC = Path(__file__).resolve().parent.parent / "docs" / "frameworks.md"
SNIPPETS = dict(re.findall(r"<!-- test: (\w+) -->\n```python\n(.*?)```", DOC.read_text(), re.S))


@pytest.fixture
def timm_package(monkeypatch):
    """`import timm.optim` from timm's released wheel: timm/__init__ and timm.models import torchvision (no build
    for the pinned torch), so timm is a bare package here and timm.models a stub (only its layer-decay grouping
    is used by the optimizer factory, not in these tests)."""
    root = released._unpacked("timm") / "timm"
    timm = types.ModuleType("timm")
    timm.__path__ = [str(root)]
    models = types.ModuleType("timm.models")

    def group_parameters(*args, **kwargs):
        raise NotImplementedError("timm.models is not importable here (it needs torchvision)")

    models.group_parameters = group_parameters
    for name in [n for n in sys.modules if n == "timm" or n.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "timm.models", models)
    yield
    for name in [n for n in sys.modules if n.startswith("timm.optim")]:
        monkeypatch.delitem(sys.modules, name, raising=False)


def test_every_snippet_is_found():
    assert set(SNIPPETS) == {"sb3", "timm", "hf", "lightning", "in_backward"}


@pytest.mark.parametrize("name", ["sb3", "timm", "hf", "lightning", "in_backward"])
def test_docs_snippet_runs(name, tmp_path, monkeypatch, request):
    if name == "timm":
        request.getfixturevalue("timm_package")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        namespace: dict = {"__name__": f"snippet_{name}"}
        exec(compile(SNIPPETS[name], f"docs/frameworks.md:{name}", "exec"), namespace)
    ours = [w for w in caught if "rmsprop_gpu" in str(w.filename) or "optimizer" in str(w.message).lower()]
    assert not ours, [str(w.message) for w in ours]
    if name == "timm":
        opt = namespace["opt"]
        assert type(opt) is rmsprop_gpu.TimmRMSpropTF
        assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 1e-5]  # timm's no-decay groups
    if name == "sb3":
        assert type(namespace["model"].policy.optimizer) is rmsprop_gpu.SB3RMSpropTFLike
    if name == "hf":
        assert type(namespace["trainer"].optimizer.optimizer) is rmsprop_gpu.TimmRMSpropTF
    if name == "in_backward":
        assert namespace["opt"].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5**3)


def _a2c_params(optimizer_class, backend=None):
    from stable_baselines3 import A2C

    kwargs = dict(alpha=0.99, eps=1e-5, weight_decay=0)
    if backend:
        kwargs["backend"] = backend
    model = A2C("MlpPolicy", "CartPole-v1", n_steps=5, seed=0, device="cpu",
                policy_kwargs=dict(optimizer_class=optimizer_class, optimizer_kwargs=kwargs))
    model.learn(total_timesteps=40)  # 8 updates, each clipped at max_grad_norm=0.5
    return [p.detach().clone() for p in model.policy.parameters()]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sb3_a2c_trains_as_with_its_own_rmsprop_tf_like(backend):
    """SB3's A2C with SB3RMSpropTFLike (its policy_kwargs, as users write them) against A2C with SB3's own
    RMSpropTFLike: the same policy after 8 clipped updates (the same rollouts: seeded env and policy)."""
    from stable_baselines3.common.sb2_compat.rmsprop_tf_like import RMSpropTFLike

    want = _a2c_params(RMSpropTFLike)
    got = _a2c_params(rmsprop_gpu.SB3RMSpropTFLike, backend)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_hf_trainer_trains_as_with_torchs_rmsprop(tmp_path):
    """The HF Trainer with optimizer_cls_and_kwargs=(rmsprop_gpu.RMSprop, ...) against torch.optim.RMSprop."""
    from transformers import Trainer, TrainingArguments

    def train(cls):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 1)

        class Wrap(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.net = model

            def forward(self, x, labels):
                return {"loss": torch.nn.functional.mse_loss(self.net(x).squeeze(-1), labels)}

        gen = torch.Generator().manual_seed(1)
        data = [{"x": torch.randn(8, generator=gen), "labels": torch.randn((), generator=gen)} for _ in range(16)]
        args = TrainingArguments(str(tmp_path / cls.__name__), max_steps=6, per_device_train_batch_size=4,
                                 report_to=[], save_strategy="no", use_cpu=True, seed=0, data_seed=0)
        Trainer(model=Wrap(), args=args, train_dataset=data,
                optimizer_cls_and_kwargs=(cls, {"lr": 1e-2, "momentum": 0.9, "centered": True})).train()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(train(rmsprop_gpu.RMSprop), train(torch.optim.RMSprop)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lightning_fit_and_checkpoint_resume_as_with_torchs_rmsprop(tmp_path):
    """Lightning's fit, save_checkpoint and fit(ckpt_path=...) with rmsprop_gpu.RMSprop against the same with
    torch.optim.RMSprop: the same params after 4 steps, a checkpoint, and 4 resumed steps."""
    import lightning as L

    def run(cls):
        class Module(L.LightningModule):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.net = torch.nn.Linear(8, 1)

            def training_step(self, batch, batch_idx):
                x, y = batch
                return torch.nn.functional.mse_loss(self.net(x), y)

            def configure_optimizers(self):
                return cls(self.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.01, centered=True)

        gen = torch.Generator().manual_seed(2)
        ds = torch.utils.data.TensorDataset(torch.randn(32, 8, generator=gen), torch.randn(32, 1, generator=gen))

        def trainer(steps):
            return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=False)

        first = Module()
        t = trainer(4)
        t.fit(first, torch.utils.data.DataLoader(ds, batch_size=8))
        t.save_checkpoint(tmp_path / f"{cls.__module__}.ckpt")
        resumed = Module()
        trainer(8).fit(resumed, torch.utils.data.DataLoader(ds, batch_size=8),
                       ckpt_path=tmp_path / f"{cls.__module__}.ckpt")
        return [p.detach().clone() for m in (first, resumed) for p in m.parameters()]

    for a, b in zip(run(rmsprop_gpu.RMSprop), run(torch.optim.RMSprop)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_readme_snippets_run_without_warnings():
    """The README's use snippets as written (on the CPU: .cuda() dropped, as the README says), with the names
    the functional ones leave to the reader defined; no warning."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    use = readme[readme.index("## Use"):readme.index("Install as a package")]
    blocks = re.findall(r"```python\n(.*?)```", use, re.S)
    assert len(blocks) == 3
    gen = torch.Generator().manual_seed(0)
    shapes = [(37,), (5, 3)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    before = [p.clone() for p in params]
    namespace = {"params": params, "grads": [torch.randn(s, generator=gen) for s in shapes],
                 "new_grads": [torch.randn(s, generator=gen) for s in shapes],
                 "square_avgs": [torch.zeros(s) for s in shapes], "grad_avgs": [torch.zeros(s) for s in shapes],
                 "momentum_buffers": [torch.zeros(s) for s in shapes], "state_steps": [torch.zeros(()) for _ in shapes]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for block in blocks:
            code = block.replace(".cuda()", "").replace('device="cuda"', 'device="cpu"')
            exec(compile(code, "README.md", "exec"), namespace)
    assert all(not torch.equal(a, b) for a, b in zip(params, before))  # the functional steps ran on them
    assert namespace["opt"].state  # and the optimizer stepped
