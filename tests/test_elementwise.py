"""Element-wise merges of fine-tuned models (task arithmetic, TIES, DARE, Breadcrumbs, SLERP,
Karcher, Model Stock): each against a float64 reference written from its paper, through the
Python API and the command line, and against mergekit on the same tiny Hugging Face models."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ckptavg import MergeSpec, merge_state_dicts
from ckptavg.cli import main as cli
from ckptavg.methods import elementwise
from ckptavg.methods.elementwise import apply_elementwise
from ckptavg.methods.task_vectors import magnitude_thresholds


def _models(n=3, shape=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]


# -- float64 references, written from the papers --------------------------------------------------


def ref_task_arithmetic(base, models, weights, lam):
    return base + lam * sum(w * (m - base) for w, m in zip(weights, models, strict=True))


def ref_ties(base, models, weights, density, lam):
    deltas = []
    for m in models:
        d = (m - base).reshape(-1)
        k = max(1, int(density * d.numel()))
        keep = torch.zeros_like(d)
        keep[d.abs().argsort(descending=True)[:k]] = 1
        deltas.append((d * keep).view_as(base))
    weighted = [w * d for w, d in zip(weights, deltas, strict=True)]
    elected = torch.where(sum(weighted) >= 0, 1.0, -1.0).double()
    numerator = sum(x * (x.sign() == elected) for x in weighted)
    denominator = sum(w * (x.sign() == elected) for w, x in zip(weights, weighted, strict=True))
    denominator = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    return base + lam * numerator / denominator


def ref_slerp(t, a, b):
    ua, ub = a.reshape(-1) / a.norm(), b.reshape(-1) / b.norm()
    theta = math.acos(float(torch.dot(ua, ub).clamp(-1, 1)))
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def ref_model_stock(base, models):
    offsets = [(m - base).reshape(-1) for m in models]
    cos = sum(float(torch.dot(a, b) / (a.norm() * b.norm())) for a, b in itertools.combinations(offsets, 2))
    cos /= math.comb(len(models), 2)
    t = len(models) * cos / (1 + (len(models) - 1) * cos)
    return t * sum(models) / len(models) + (1 - t) * base


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, -0.3, 1.2]])
def test_task_arithmetic_and_ties_against_the_papers(weights):
    base, models = _models()
    b64, m64 = base.double(), [m.double() for m in models]
    got = apply_elementwise("task_arithmetic", "w", base, models, weights, {"lambda": 0.7})
    assert torch.allclose(got.double(), ref_task_arithmetic(b64, m64, weights, 0.7), atol=1e-6)
    for density in (1.0, 0.5, 0.1):
        got = apply_elementwise("ties", "w", base, models, weights, {"density": density, "lambda": 0.9})
        assert torch.allclose(got.double(), ref_ties(b64, m64, weights, density, 0.9), atol=1e-6), density


def test_the_magnitude_threshold_is_the_exact_kth_largest_over_any_chunking():
    g = torch.Generator().manual_seed(3)
    values = torch.cat(
        [torch.randn(997, generator=g), torch.zeros(40), torch.full((30,), -0.5), torch.tensor([1e-40, -3e38])]
    )
    other = values.flip(0) * 3
    for density in (1e-4, 0.01, 0.3, 0.5, 0.97, 0.9999, 1.0):
        k = max(1, int(density * values.numel()))
        expected = [float(t.abs().sort(descending=True).values[k - 1]) for t in (values, other)]
        for size in (1, 64, 5000):
            chunks = lambda size=size: zip(values.split(size), other.split(size), strict=True)  # noqa: E731
            assert magnitude_thresholds(chunks, values.numel(), density) == expected, (density, size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_merges_match_one_chunk_bit_for_bit_and_leave_the_inputs_alone(monkeypatch, dtype):
    base, models = _models(shape=(37, 29))
    base, models = base.to(dtype), [m.to(dtype) for m in models]
    before = [t.clone() for t in (base, *models)]
    cases = {
        "task_arithmetic": {"lambda": 0.7},
        "ties": {"density": 0.3, "lambda": 0.9},
        "dare_ties": {"density": 0.5, "seed": 1},
        "breadcrumbs": {"density": 0.8, "gamma": 0.05},
    }
    whole = {m: apply_elementwise(m, "w", base, models, [0.5, -0.3, 1.2], o) for m, o in cases.items()}
    monkeypatch.setattr(elementwise, "BLOCK_NUMEL", 100)  # 11 chunks, the last one short
    for method, options in cases.items():
        chunked = apply_elementwise(method, "w", base, models, [0.5, -0.3, 1.2], options)
        assert chunked.dtype == dtype and torch.equal(chunked, whole[method]), method
    if dtype == torch.float32:
        ties = ref_ties(base.double(), [m.double() for m in models], [0.5, -0.3, 1.2], 0.3, 0.9)
        assert torch.allclose(whole["ties"].double(), ties, atol=1e-6)
    else:  # computed in float32, rounded once
        upcast = apply_elementwise(
            "ties", "w", base.float(), [m.float() for m in models], [0.5, -0.3, 1.2], cases["ties"]
        )
        assert torch.equal(whole["ties"], upcast.to(dtype))
    for original, now in zip(before, (base, *models), strict=True):
        assert torch.equal(original, now)


def test_dare_drops_at_the_given_rate_rescales_and_repeats_its_bits_for_a_seed():
    base, models = _models(n=2, shape=(200, 50))
    options = {"density": 0.3, "seed": 7}
    first = apply_elementwise("dare_linear", "layer.weight", base, models, [1.0, 1.0], options)
    again = apply_elementwise("dare_linear", "layer.weight", base, models, [1.0, 1.0], options)
    assert torch.equal(first, again)  # the same seed, the same bits
    other = apply_elementwise("dare_linear", "layer.weight", base, models, [1.0, 1.0], {**options, "seed": 8})
    assert not torch.equal(first, other)
    single = apply_elementwise("dare_linear", "layer.weight", base, models[:1], [1.0], options)
    delta, kept = models[0] - base, single - base
    assert abs(float((kept != 0).double().mean()) - 0.3) < 0.02
    assert torch.allclose(kept.abs().sum(), delta.abs().sum(), rtol=1e-5)  # the L1 norm is kept
    ties = apply_elementwise("dare_ties", "layer.weight", base, models, [1.0, 1.0], options)
    assert ties.shape == base.shape and torch.isfinite(ties).all()


def test_slerp_karcher_model_stock_and_breadcrumbs_against_references():
    base, models = _models(n=3)
    got = apply_elementwise("slerp", "w", base, models[:1], [1.0], {"t": 0.3})
    assert torch.allclose(got.double(), ref_slerp(0.3, base.double(), models[0].double()), atol=1e-6)
    parallel = apply_elementwise("slerp", "w", base, [2 * base], [1.0], {"t": 0.25})
    assert torch.allclose(parallel, 1.25 * base)  # nearly parallel: linear interpolation
    # The Karcher mean of two directions is the arc's midpoint, scaled by the mean norm.
    a, b = models[0], models[1]
    karcher = apply_elementwise("karcher", "w", None, [a, b], [1.0, 1.0], {"tol": 1e-9, "max_iter": 50})
    midpoint = ref_slerp(0.5, a.double() / a.norm(), b.double() / b.norm())
    assert torch.allclose(karcher.double(), midpoint / midpoint.norm() * (a.norm() + b.norm()) / 2, atol=1e-5)
    stock = apply_elementwise("model_stock", "w", base, models, [1.0] * 3, {})
    assert torch.allclose(stock.double(), ref_model_stock(base.double(), [m.double() for m in models]), atol=1e-6)
    crumbs = apply_elementwise("breadcrumbs", "w", base, models[:1], [1.0], {"density": 0.5, "gamma": 0.1})
    kept = (crumbs - base).reshape(-1) != 0
    delta = (models[0] - base).reshape(-1).abs()
    assert int(kept.sum()) == 15  # half of 30 entries
    assert not kept[delta.argmax()] and not kept[delta.argmin()]  # the largest (outliers) and smallest dropped


def test_per_tensor_options_and_bad_options_are_named():
    base, models = _models(n=1)
    rules = {"t": [{"filter": "attn", "value": 0.0}, {"value": 1.0}]}
    assert torch.equal(apply_elementwise("slerp", "h.0.attn.c_attn.weight", base, models, [1.0], rules), base)
    assert torch.allclose(apply_elementwise("slerp", "h.0.mlp.c_fc.weight", base, models, [1.0], rules), models[0])
    with pytest.raises(ValueError, match="has no option 'densty'"):
        MergeSpec("ties", densty=0.5)
    with pytest.raises(ValueError, match="needs a last rule without 'filter'"):
        MergeSpec("slerp", t=[{"filter": "attn", "value": 0.3}])
    with pytest.raises(ValueError, match="needs a base model"):
        merge_state_dicts([{"w": base}], "ties")
    with pytest.raises(ValueError, match="takes at most 1 input model"):
        merge_state_dicts([{"w": base}, {"w": base}], "slerp", base={"w": base})
    with pytest.raises(ValueError, match=r"key 'w' has shape \(3,\)"):
        merge_state_dicts([{"w": torch.zeros(3)}], "ties", base={"w": base})


def test_the_python_api_takes_names_specs_and_paths(tmp_path):
    from safetensors.torch import save_file

    base, models = _models(n=2)
    save_file({"w": base, "n": torch.tensor([3])}, str(tmp_path / "base.safetensors"))
    paths = []
    for i, m in enumerate(models):
        save_file({"w": m, "n": torch.tensor([i])}, str(tmp_path / f"m{i}.safetensors"))
        paths.append(tmp_path / f"m{i}.safetensors")
    by_name = merge_state_dicts(paths, "ties", base=tmp_path / "base.safetensors", density=0.5, weights=[1.0, 0.5])
    by_spec = merge_state_dicts(
        paths, MergeSpec("ties", density=0.5), base=tmp_path / "base.safetensors", weights=[1.0, 0.5]
    )
    assert torch.equal(by_name["w"], by_spec["w"]) and torch.equal(
        by_name["n"], torch.tensor([3])
    )  # integers: the base's
    expected = ref_ties(base.double(), [m.double() for m in models], [1.0, 0.5], 0.5, 1.0)
    assert torch.allclose(by_name["w"].double(), expected, atol=1e-6)


# -- Hugging Face models, the command line and mergekit ------------------------------------------


def _hf_models(root: Path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    base = GPT2LMHeadModel(config)
    base.save_pretrained(root / "base")
    folders = []
    for i in range(3):
        model = GPT2LMHeadModel(config)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        model.save_pretrained(root / f"ft{i}")
        folders.append(root / f"ft{i}")
    return root / "base", folders


def _tensors(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return _hf_models(tmp_path_factory.mktemp("hf"))


def test_cli_merges_fine_tunes_into_a_from_pretrained_folder_with_the_inputs_recorded(hf, tmp_path):
    from transformers import AutoModelForCausalLM

    base, fts = hf
    out = tmp_path / "ties"
    assert (
        cli(
            [
                "merge",
                "--method",
                "ties",
                "--base",
                str(base),
                *map(str, fts),
                "--option",
                "density=0.5",
                "-o",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    merged, metadata = _tensors(out)
    assert metadata["method"] == "ties" and json.loads(metadata["options"]) == {"density": 0.5}
    assert [i["path"] for i in json.loads(metadata["inputs"])] == [str(f) for f in fts]
    assert len(json.loads(metadata["base"])["sha256"]) == 64
    expected = merge_state_dicts(fts, "ties", base=base, density=0.5)
    for name, tensor in merged.items():
        assert torch.equal(tensor, expected[name]), name
    assert (out / "config.json").is_file()
    AutoModelForCausalLM.from_pretrained(out)  # loads


def test_cli_refuses_before_writing_anything(hf, tmp_path):
    from safetensors.torch import save_file

    base, fts = hf
    out = tmp_path / "out"
    assert cli(["merge", "--method", "ties", *map(str, fts), "-o", str(out), "-q"]) == 2  # no --base
    tensors, _ = _tensors(fts[0])
    tensors["transformer.wte.weight"] = torch.zeros(65, 16)  # another vocabulary
    save_file(tensors, str(tmp_path / "other.safetensors"))
    assert (
        cli(
            [
                "merge",
                "--method",
                "ties",
                "--base",
                str(base),
                str(tmp_path / "other.safetensors"),
                "-o",
                str(out),
                "-q",
            ]
        )
        == 2
    )
    config = tmp_path / "sliced.yml"
    config.write_text("merge_method: slerp\nslices:\n  - sources: []\n")
    assert cli(["merge", "--config", str(config), "-o", str(out), "-q"]) == 2
    assert not out.exists()


MERGEKIT_CASES = {
    "linear": ("parameters: {}", {"weight": [1.0, 0.5, 0.5]}),
    "task_arithmetic": ("parameters: {lambda: 0.8}", {"weight": [1.0, 0.5, -0.3]}),
    "ties": ("parameters: {density: 0.5}", {"weight": [1.0, 0.7, 0.4]}),
    "model_stock": ("parameters: {}", {}),
    "slerp": ("parameters: {t: 0.4}", {}),
}


@pytest.mark.parametrize("method", sorted(MERGEKIT_CASES))
def test_equal_to_mergekit_on_the_same_models_and_config(hf, tmp_path, method):
    yaml = pytest.importorskip("yaml")
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    base, fts = hf
    inputs = fts[:1] if method == "slerp" else fts
    parameters, per_model = MERGEKIT_CASES[method]
    models = [
        {"model": str(f), **({"parameters": {k: v[i] for k, v in per_model.items()}} if per_model else {})}
        for i, f in enumerate(inputs)
    ]
    if method == "slerp":
        models = [{"model": str(base)}, *models]
    config = {"merge_method": method, "models": models, "dtype": "float32", **yaml.safe_load(parameters)}
    if method != "linear":
        config["base_model"] = str(base)
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(config))
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mergekit"), MergeOptions())
    assert cli(["merge", "--config", str(tmp_path / "merge.yml"), "-o", str(tmp_path / "ours"), "-q"]) == 0
    theirs, _ = _tensors(tmp_path / "mergekit")
    ours, _ = _tensors(tmp_path / "ours")
    differences = {name: float((ours[name].double() - theirs[name].double()).abs().max()) for name in theirs}
    worst = max(differences.values())
    print(f"{method}: max abs difference to mergekit {worst:.3g}")
    assert set(theirs) <= set(ours)
    assert worst <= 1e-6, sorted(differences.items(), key=lambda kv: -kv[1])[:3]
