"""Original `.pth` checkpoints -> dermjax checkpoints: layouts, checks, logits and moments.

Each `.pth` is built here the way the original's code builds its model (a torchvision backbone
cut as `model/vision` does, and the documented head) with random weights, trained a few steps
where optimizer state is wanted, saved in the documented layout and converted. The restored
dermjax checkpoint must give the torch logits within 1e-4 * max(1, max|logit|) in float32.
"""

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from dermjax import experiment
from dermjax.config import validate
from dermjax.configs import default
from dermjax.errors import ConfigError, UserError
from dermjax.train.checkpoint import CheckpointReader, restore_weights_only
from dermjax.weights import original, original_reference
from tests.models import parity

torch = pytest.importorskip("torch")
nn = torch.nn
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "convert_original_checkpoint.py"
CLASSES = ["acne", "eczema", "melanoma", "psoriasis"]
TEXT_DIM = 12
TOL = 1e-4


# ---- The original model, written from the documentation ---------------------------------------
class OriginalMLP(nn.Module):
    """`model/utils.MLP`: Linear -> BN -> act -> Dropout per hidden size, then a Linear."""

    def __init__(self, in_dim, hidden, out_dim, act):
        super().__init__()
        layers, sizes = [], [in_dim, *hidden]
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b), act(), nn.Dropout(0.3)]
        self.layers = nn.Sequential(*layers, nn.Linear(sizes[-1], out_dim))

    def forward(self, x):
        return self.layers(x)


def original_mlp(in_dim, hidden, out_dim, act):
    """An empty hidden list gives a bare Linear."""
    return OriginalMLP(in_dim, hidden, out_dim, act) if hidden else nn.Linear(in_dim, out_dim)


class OriginalHead(nn.Module):
    def __init__(self, vision_dim, h, class_weights=None):
        super().__init__()
        if h["fusion_strategy"] == "weighted_sum":
            self.alpha_vision = nn.Parameter(torch.tensor(0.5))
            self.alpha_text = nn.Parameter(torch.tensor(0.5))
        if class_weights is not None:
            self.register_buffer("class_weights_tensor", torch.tensor(class_weights))
        act, proj, c = h["act"], h["projection_dim"], len(CLASSES)
        self.vision_projection = original_mlp(vision_dim, h["image_hidden"], proj, act)
        self.text_projection = original_mlp(TEXT_DIM, h["text_hidden"], proj, act)
        final_in = proj if h["fusion_strategy"] == "weighted_sum" else 2 * proj
        self.final_classifier = original_mlp(final_in, h["final_hidden"], c, act)
        self.aux = h["aux"]
        if self.aux:
            self.aux_vision_classifier = nn.Linear(proj, c)
            self.aux_text_classifier = nn.Linear(proj, c)
        self.l2 = h["l2"]
        self.criterion = nn.CrossEntropyLoss(
            weight=None if class_weights is None else torch.tensor(class_weights)
        )

    def forward(self, v, t):
        pv, pt = self.vision_projection(v), self.text_projection(t)
        if self.l2:
            pv, pt = nn.functional.normalize(pv, dim=1), nn.functional.normalize(pt, dim=1)
        if hasattr(self, "alpha_vision"):
            w = torch.softmax(torch.stack([self.alpha_vision, self.alpha_text]), 0)
            fused = w[0] * pv + w[1] * pt
        else:
            fused = torch.cat([pv, pt], 1)
        out = [self.final_classifier(fused)]
        if self.aux:
            out += [self.aux_vision_classifier(pv), self.aux_text_classifier(pt)]
        return out


class OriginalVision(nn.Module):
    def __init__(self, tv_model, name, pooling):
        super().__init__()
        self.name, self.pooling = name, pooling
        if name.startswith("vit"):
            self.model = tv_model
        elif name.startswith("resnet"):
            self.model = nn.Sequential(*list(tv_model.children())[:-2])
        else:
            self.model = tv_model.features

    def forward(self, x):
        if self.name.startswith("vit"):
            x = self.model._process_input(x)
            x = torch.cat([self.model.class_token.expand(x.shape[0], -1, -1), x], 1)
            return self.model.encoder(x)[:, 0]
        f = self.model(x)
        avg, mx = f.mean((2, 3)), f.amax((2, 3))
        return {"avg": avg, "max": mx, "concat": torch.cat([avg, mx], 1)}[self.pooling]


CASES = {
    "resnet50": dict(
        size=64, pooling="concat", vision_dim=4096, fusion_strategy="concat_mlp", aux=False,
        image_hidden=(24,), text_hidden=(16,), final_hidden=(20,), projection_dim=8,
        act=nn.ReLU, activation="relu", l2=False, class_weights=[1.0, 2.0, 0.5, 1.5], steps=2,
    ),
    "efficientnet_b0": dict(
        size=64, pooling="avg", vision_dim=1280, fusion_strategy="weighted_sum", aux=True,
        image_hidden=(), text_hidden=(), final_hidden=(), projection_dim=8,
        act=nn.GELU, activation="gelu", l2=True, class_weights=None, steps=0,
    ),
    "vit_b_32": dict(
        size=64, pooling="avg", vision_dim=768, fusion_strategy="weighted_sum", aux=True,
        image_hidden=(16,), text_hidden=(), final_hidden=(10, 6), projection_dim=8,
        act=nn.SiLU, activation="silu", l2=False, class_weights=None, steps=1, unfreeze=0,
    ),
}  # fmt: skip


def make_config(name, h):
    cfg = default.get_config()
    cfg.vision_model.update(
        name=name,
        pretrained=False,
        pooling_type=h["pooling"],
        unfreeze_layers=h.get("unfreeze", -1),
    )
    cfg.data.img_size = (h["size"], h["size"])
    cfg.training.use_normalization = False  # as saved by `build_original`
    cfg.multimodal_classifier.update(
        projection_dim=h["projection_dim"],
        image_projection_hidden=h["image_hidden"],
        text_projection_hidden=h["text_hidden"],
        final_hidden_sizes=h["final_hidden"],
        fusion_strategy=h["fusion_strategy"],
        use_auxiliary_loss=h["aux"],
        projection_activation=h["activation"],
        final_activation=h["activation"],
        use_l2_normalization=h["l2"],
        use_class_weights_from_data=h["class_weights"] is not None,
    )
    validate(cfg)
    return cfg


def saved_config(name, h):
    """The `config` entry the original saves (enough of it for the converter's checks)."""
    return {
        "vision_model": {"name": name, "pooling_type": h["pooling"], "img_size": h["size"]},
        "multimodal_classifier": {
            "num_classes": len(CLASSES),
            "projection_activation": h["activation"],
            "final_activation": h["activation"],
        },
        "optimizer": {
            "vision_model": {"name": "adamw"},
            "multimodal_classifier": {"name": "AdamW"},
        },
    }


def build_original(name, tmp_path, epoch=6):
    """(path of the saved .pth, vision module, head module, optimizers) for case `name`."""
    h = CASES[name]
    tv = parity.import_torchvision()
    torch.manual_seed(0)
    kwargs = {"image_size": h["size"]} if name.startswith("vit") else {}
    backbone = parity.randomize_torch_model(getattr(tv.models, name)(**kwargs), h["size"])
    vision = OriginalVision(backbone, name, h["pooling"])
    torch.manual_seed(1)
    head = OriginalHead(h["vision_dim"], h, h["class_weights"])
    opts = {
        "vision": torch.optim.AdamW(vision.parameters(), lr=1e-4, weight_decay=1e-3),
        "multimodal_classifier": torch.optim.AdamW(head.parameters(), lr=5e-4, weight_decay=1e-3),
    }
    vision.requires_grad_(h.get("unfreeze", -1) != 0)  # unfreeze_layers: 0 freezes it all
    vision.train(), head.train()
    for step in range(h["steps"]):  # fills the moments; BN statistics move too
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(4, 3, h["size"], h["size"], generator=gen)
        t = torch.randn(4, TEXT_DIM, generator=gen)
        loss = head.criterion(head(vision(x), t)[0], torch.tensor([0, 1, 2, 3]))
        for opt in opts.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts.values():
            opt.step()
    vision.eval(), head.eval()
    path = tmp_path / f"{name}_epoch_{epoch:03d}.pth"
    torch.save(
        {
            "epoch": epoch,
            "loss": 1.25,
            "config": saved_config(name, h),
            "experiment_name": name,
            "vision_model_state_dict": vision.state_dict(),
            "multimodal_classifier_state_dict": head.state_dict(),
            "optimizers_state_dict": {k: o.state_dict() for k, o in opts.items()},
            "best_val_loss": 0.75,
            "patience_counter": 2,
            "normalization_mean": None,
            "normalization_std": None,
            "classes": CLASSES,
            "class_to_idx": {c: i for i, c in enumerate(CLASSES)},
            "num_classes": len(CLASSES),
        },
        path,
    )
    return path, vision, head, opts


def torch_model(vision, head):
    """The test's own original model as `compare_logits` takes a reference."""

    def run(images, text):
        with torch.no_grad():
            x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
            out = head(vision(x), torch.from_numpy(text))
        keys = ["logits", "aux_vision_logits", "aux_text_logits"]
        return {k: o.numpy() for k, o in zip(keys, out, strict=False)}

    return run


def restore(cfg, out):
    """(eval-mode dermjax model with the weights `init_from` reads from `out`, its meta, the
    abstract train state a resume of `cfg` restores into); nothing is randomly initialised."""
    graphs = {}

    def init():
        model = experiment.make_model(
            cfg, num_classes=len(CLASSES), text_dim=TEXT_DIM, rngs=nnx.Rngs(params=9, dropout=9)
        )
        parts, state, _, _ = experiment.init_training(cfg, model)
        graphs["eval"] = parts.eval_graph
        return state, parts.rngs

    state, rngs = jax.eval_shape(init)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state
    )
    weights, meta = restore_weights_only(
        str(out), {k: abstract[k] for k in ("params", "batch_stats")}
    )
    net = nnx.merge(graphs["eval"], weights["params"], weights["batch_stats"], rngs)
    nnx.reseed(net, dropout=jax.random.key(0))
    return net, meta, abstract


def assert_same_outputs(cfg, out, vision, head):
    """The restored model's logits and aux logits equal the torch model's (float32, within
    1e-4 * max(1, max|logit|)); returns the meta and abstract train state of `restore`."""
    net, meta, abstract = restore(cfg, out)
    size = tuple(cfg.data.img_size)
    check = original_reference.compare_logits(
        net, torch_model(vision, head), image_size=size, text_dim=TEXT_DIM, seed=3
    )
    assert check["ok"], check
    return meta, abstract


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """torch's spinning worker threads cost several times the work on a shared small CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("convert_original_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_resnet50_concat_mlp_converts_with_adamw_moments_and_resumes(script, tmp_path, monkeypatch):
    h = CASES["resnet50"]
    cfg = make_config("resnet50", h)
    path, vision, head, opts = build_original("resnet50", tmp_path)
    cfg.multimodal_classifier.update(
        use_class_weights_from_data=False, class_weights=(1.0, 2.0, 0.5, 9.0)
    )
    with pytest.raises(ConfigError, match="class_weights differ"):
        script.convert(path, cfg, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    cfg.multimodal_classifier.class_weights = tuple(h["class_weights"])
    with monkeypatch.context() as patch:
        patch.setattr(original_reference, "RELATIVE_TOLERANCE", -1.0)  # no difference can pass
        with pytest.raises(UserError, match="nothing written"):
            script.convert(path, cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    report = script.convert(path, cfg, tmp_path / "out")
    assert report["verification"]["ok"] and report["epoch"] == 7
    meta, abstract = assert_same_outputs(cfg, tmp_path / "out", vision, head)
    assert meta["classes"] == CLASSES and meta["epoch"] == 7 and meta["finished"] is None
    assert meta["normalization_mean"] == [0.0, 0.0, 0.0]  # saved None: no normalisation
    # Full resume read: the AdamW moments sit where the torch parameters' moments were.
    with CheckpointReader(str(tmp_path / "out" / "checkpoints")) as reader:
        restored, _ = reader.restore(None, abstract_state=abstract)
    adam = restored["opt_backbone"].inner_states["trainable"].inner_state.inner_state[0]
    torch_state = opts["vision"].state_dict()["state"]
    conv = torch_state[0]["exp_avg"].numpy().transpose(2, 3, 1, 0)  # model.0 = conv1, OIHW
    np.testing.assert_allclose(np.asarray(adam.mu["conv1"]["kernel"]), conv, rtol=1e-6)
    assert int(adam.count) == 2
    head_adam = restored["opt_head"].inner_state[0]
    last = opts["multimodal_classifier"].state_dict()["state"]
    w = last[len(last) - 1]["exp_avg_sq"].numpy()  # final_classifier.layers.4.bias
    np.testing.assert_allclose(np.asarray(head_adam.nu["final_classifier"]["out"]["bias"]), w)


@pytest.mark.slow
def test_efficientnet_weighted_sum_aux_and_l2_convert_via_the_script(tmp_path):
    h = CASES["efficientnet_b0"]
    path, vision, head, _ = build_original("efficientnet_b0", tmp_path)
    yaml_text = """
vision_model: {name: efficientnet_b0, pretrained: false, pooling_type: avg}
data: {dataset: dataset_v1, img_size: [64, 64]}
training: {use_normalization: false}
optimizer:
  vision_model: {name: adamw, learning_rate: 1.0e-4, weight_decay: 1.0e-3}
  multimodal_classifier: {name: adamw, learning_rate: 5.0e-4, weight_decay: 1.0e-3}
multimodal_classifier:
  loss_fn: cross_entropy
  projection_dim: 8
  image_projection_hidden: []
  text_projection_hidden: []
  final_hidden_sizes: []
  fusion_strategy: weighted_sum
  use_auxiliary_loss: true
  projection_activation: gelu
  final_activation: gelu
  use_l2_normalization: true
"""
    (tmp_path / "exp.yaml").write_text(yaml_text)
    out = tmp_path / "converted"
    cmd = [sys.executable, str(SCRIPT), "--pth", str(path), "--config", str(tmp_path / "exp.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert f"load_from={out}" in done.stdout
    report = json.loads((out / "conversion.json").read_text())
    assert report["head"]["fusion_strategy"] == "weighted_sum" and report["verification"]["ok"]
    assert report["unverifiable"] == {"use_l2_normalization": True}
    assert "use_l2_normalization=True is taken from --config" in done.stderr
    assert "orbax" not in done.stderr.lower(), done.stderr  # its INFO lines are not shown
    assert "never stepped" in report["optimizers"]["vision"][0]
    meta, _ = assert_same_outputs(make_config("efficientnet_b0", h), out, vision, head)
    assert meta["epoch"] == 7


@pytest.mark.slow
def test_vit_with_frozen_backbone_converts(script, tmp_path):
    h = CASES["vit_b_32"]
    cfg = make_config("vit_b_32", h)
    path, vision, head, _ = build_original("vit_b_32", tmp_path)
    report = script.convert(path, cfg, tmp_path / "out")
    assert report["head"]["final_hidden_sizes"] == (10, 6)
    assert "never stepped" in report["optimizers"]["vision"][0]
    assert_same_outputs(cfg, tmp_path / "out", vision, head)


def test_a_checkpoint_trained_on_other_inputs_or_another_loss_is_refused_naming_each(script):
    h = CASES["efficientnet_b0"]
    structure = original.infer_head(OriginalHead(1280, h).state_dict())
    saved = saved_config("efficientnet_b0", h)
    saved["vision_model"]["img_size"] = 380
    saved["multimodal_classifier"].update(loss_fn="focal", label_smoothing=0.0)
    info = {"config": saved, "normalization_mean": None, "normalization_std": None}
    ckpt = original.OriginalCheckpoint("x.pth", 6, CLASSES, {}, {}, None, {}, info)
    cfg = make_config("efficientnet_b0", h)
    cfg.training.use_normalization = True
    cfg.multimodal_classifier.label_smoothing = 0.1
    problems = script.config_problems(ckpt, structure, cfg)
    assert problems == [
        "multimodal_classifier.loss_fn='cross_entropy', but the checkpoint was trained with "
        "'focal'",
        "multimodal_classifier.label_smoothing=0.1, but the checkpoint was trained with 0.0",
        "data.img_size=(64, 64), but the checkpoint was trained at (380, 380)",
        "training.use_normalization=True, but the checkpoint was trained without Normalize "
        "(normalization_mean None): set training.use_normalization=false",
    ]
    saved["vision_model"]["img_size"] = [64, 64]
    saved["multimodal_classifier"].update(loss_fn="cross_entropy", label_smoothing=0.1)
    info.update(normalization_mean=[0.6, 0.5, 0.4], normalization_std=[0.2, 0.2, 0.2])
    assert script.config_problems(ckpt, structure, cfg) == [
        "training.compute_stats=False (ImageNet statistics), but the checkpoint was trained with "
        "mean [0.6, 0.5, 0.4], std [0.2, 0.2, 0.2] computed from its images: set "
        "training.compute_stats=true"
    ]
    cfg.training.compute_stats = True
    assert script.config_problems(ckpt, structure, cfg) == []
    cfg.training.use_normalization = False
    assert (
        "training.use_normalization=False, but the checkpoint was trained with Normalize"
        in (script.config_problems(ckpt, structure, cfg)[0])
    )
    del info["normalization_mean"]  # files from before use_normalization: ImageNet's
    cfg.training.update(use_normalization=True, compute_stats=False)
    assert script.config_problems(ckpt, structure, cfg) == []


def test_infer_head_reads_mlps_fusion_and_aux_from_shapes():
    h = CASES["vit_b_32"]
    head = OriginalHead(768, h)
    s = original.infer_head({k: v for k, v in head.state_dict().items()})
    assert (s.vision_dim, s.text_dim, s.projection_dim, s.num_classes) == (768, TEXT_DIM, 8, 4)
    assert s.image_projection_hidden == (16,) and s.text_projection_hidden == ()
    assert s.final_hidden_sizes == (10, 6)
    assert s.fusion_strategy == "weighted_sum" and s.use_auxiliary_loss
    assert original.head_key(s, "final_classifier.layers.5.running_var") == (
        "final_classifier.hidden.1.norm.running_var"
    )
    assert original.head_key(s, "final_classifier.layers.8.weight") == "final_classifier.out.weight"
    assert original.head_key(s, "text_projection.bias") == "text_projection.out.bias"


def test_head_adamw_moments_follow_parameter_order_and_misfits_are_dropped(caplog):
    from dermjax.models.fusion import MultimodalClassifier
    from dermjax.train import optim

    h = CASES["vit_b_32"]  # weighted_sum (alphas first in parameters()), aux heads, MLPs
    torch.manual_seed(0)
    head = OriginalHead(768, h)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    out = head(torch.randn(4, 768), torch.randn(4, TEXT_DIM))
    sum(o.sum() for o in out).backward()
    opt.step()
    s = original.infer_head(head.state_dict())
    fields = {k: v for k, v in s.config_fields().items() if k != "use_auxiliary_loss"}
    model = MultimodalClassifier(
        768, TEXT_DIM, 4, rngs=nnx.Rngs(0), use_auxiliary_loss=True, **fields
    )
    weights = {original.head_key(s, k): v for k, v in head.state_dict().items()}
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = optim.make_group_tx("adamw", learning_rate=1e-3, weight_decay=0.0)
    state, notes = original.convert_optimizer_state(
        tx.init(params), opt.state_dict(), module=model, weights=weights, optimizer="adamw"
    )
    adam = state.inner_state[0]
    torch_state = opt.state_dict()["state"]
    assert float(adam.mu["alpha_vision"]) == pytest.approx(float(torch_state[0]["exp_avg"]))
    np.testing.assert_allclose(  # vision_projection.layers.0.weight: (out, in) -> kernel (in, out)
        np.asarray(adam.nu["vision_projection"]["hidden"][0]["linear"]["kernel"]),
        torch_state[2]["exp_avg_sq"].numpy().T,
    )
    assert int(adam.count) == 1 and "converted, step 1" in notes[0]
    uneven = opt.state_dict()
    uneven["state"][2]["step"] = torch.tensor(7.0)  # e.g. a layer unfrozen later steps less
    uneven["state"][0]["step"] = torch.tensor(3.0)
    state, notes = original.convert_optimizer_state(
        tx.init(params), uneven, module=model, weights=weights, optimizer="adamw"
    )
    assert int(state.inner_state[0].count) == 7  # the largest step
    assert "per-parameter steps [1, 3, 7] differ: all use 7" in notes
    dropped, notes = original.convert_optimizer_state(
        tx.init(params), opt.state_dict(), module=model, weights=weights, optimizer="sgd"
    )
    assert notes[0].startswith("dropped") and "restarts them at zero" in caplog.text
    assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(dropped.inner_state[0].mu))


def test_structure_mismatch_and_legacy_layout_are_user_errors(script, tmp_path):
    h = CASES["efficientnet_b0"]
    head = OriginalHead(1280, h)
    vision = {"model.0.0.weight": torch.zeros(32, 3, 3, 3)}
    raw = {"epoch": 0, "classes": CLASSES, "vision_model_state_dict": vision}
    torch.save({**raw, "multimodal_classifier_state_dict": head.state_dict()}, tmp_path / "a.pth")
    cfg = make_config("efficientnet_b0", {**h, "projection_dim": 16, "pooling": "concat"})
    with pytest.raises(ConfigError) as error:
        script.convert(tmp_path / "a.pth", cfg, tmp_path / "out")
    assert "multimodal_classifier.projection_dim=16" in str(error.value)
    assert "pooling_type='concat' gives 2560 features" in str(error.value)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("")
    with pytest.raises(UserError, match="not an empty folder"):
        script.convert(tmp_path / "a.pth", cfg, tmp_path / "used")
    torch.save({**raw, "images_classifier_state_dict": {}}, tmp_path / "legacy.pth")
    with pytest.raises(UserError, match="legacy layout"):
        original.read_pth(tmp_path / "legacy.pth")


def test_data_parallel_prefixes_are_dropped_and_a_pickled_model_is_named(tmp_path):
    head = OriginalHead(1280, CASES["efficientnet_b0"]).state_dict()
    vision = {"model.0.0.weight": torch.zeros(32, 3, 3, 3)}
    torch.save(
        {
            "epoch": 0,
            "classes": CLASSES,
            "vision_model_state_dict": {f"module.{k}": v for k, v in vision.items()},
            "multimodal_classifier_state_dict": {f"module.{k}": v for k, v in head.items()},
        },
        tmp_path / "dp.pth",
    )
    ckpt = original.read_pth(tmp_path / "dp.pth")
    assert list(ckpt.vision) == list(vision) and set(ckpt.head) <= set(head)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pth")
    with pytest.raises(UserError) as error:
        original.read_pth(tmp_path / "model.pth")
    assert str(error.value) == (
        f"--pth {tmp_path / 'model.pth'}: holds pickled Python objects "
        "(torch.nn.modules.linear.Linear), not the original's checkpoint dict of state_dicts and "
        "plain values (a whole model saved with torch.save(model)?)"
    )


def test_numpy_values_in_a_checkpoint_load_and_a_cut_short_file_is_named(tmp_path):
    head = OriginalHead(1280, CASES["efficientnet_b0"]).state_dict()
    raw = {
        "epoch": np.int64(3),  # numpy values where the original wrote Python ones
        "loss": np.float64(1.25),
        "normalization_mean": np.array([0.5, 0.5, 0.5]),
        "classes": CLASSES,
        "vision_model_state_dict": {"model.0.0.weight": torch.zeros(32, 3, 3, 3)},
        "multimodal_classifier_state_dict": head,
    }
    torch.save(raw, tmp_path / "np.pth")
    ckpt = original.read_pth(tmp_path / "np.pth")
    assert ckpt.epoch == 3 and ckpt.info["loss"] == 1.25
    np.testing.assert_array_equal(ckpt.info["normalization_mean"], [0.5, 0.5, 0.5])
    data = (tmp_path / "np.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as error:
        original.read_pth(tmp_path / "cut.pth")
    assert str(error.value) == (
        f"--pth {tmp_path / 'cut.pth'}: the file is cut short or damaged (an interrupted save "
        "or copy?): copy it again"
    )


def test_an_unfinished_conversion_folder_is_named_as_such(script, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir(parents=True)
    cfg = make_config("efficientnet_b0", CASES["efficientnet_b0"])
    with pytest.raises(UserError, match=r"holds an unfinished conversion \(stopped\?\): delete it"):
        script.convert(tmp_path / "a.pth", cfg, out)


@pytest.mark.parametrize("field", ["load_from", "init_from"])
def test_pth_in_load_from_is_a_config_error_naming_the_converter(field):
    cfg = default.get_config()
    cfg.checkpoint[field] = "runs/exp_best.pth"
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert (
        "python scripts/convert_original_checkpoint.py --pth runs/exp_best.pth "
        "--config ORIGINAL_YAML --out runs/exp_best_dermjax"
    ) in str(error.value)


def test_a_pth_on_a_bucket_is_copied_here_before_the_conversion():
    # The converter reads local files; the hint used to say `--out gs:/b/exp_best_dermjax`.
    assert original.conversion_command("gs://b/runs/exp_best.pth") == (
        "gcloud storage cp gs://b/runs/exp_best.pth . && python scripts/"
        "convert_original_checkpoint.py --pth exp_best.pth --config ORIGINAL_YAML "
        "--out exp_best_dermjax"
    )
