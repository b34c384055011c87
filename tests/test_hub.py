"""Plans on the Hub: push, load by repo id, revisions, offline cache, pipelines, errors.

Everything runs the real huggingface_hub client over real HTTP against ``tests/hub_server.py``, a test double of
the Hub's HTTP API on pytest-httpserver, on 127.0.0.1 (nothing in the client is mocked). huggingface_hub reads ``HF_ENDPOINT``,
``HF_HOME``, ``HF_HUB_OFFLINE``... when it is imported, which conftest does before any fixture runs, so the
``hub`` fixtures patch ``huggingface_hub.constants`` (and the module-level ``HfApi`` behind diffusers'
``create_repo`` / ``upload_folder`` / ``model_info``) as well as setting the environment for subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_unet, unet_inputs
from diffusers import DiffusionPipeline, UNet2DConditionModel
from hub_server import LoopbackHub
from typer.testing import CliRunner

import diffusers_mixdq.hub as mixdq_hub
from diffusers_mixdq import BitPlan, MixDQConfig, MixDQError, PlanMismatchError, PlanSourceError
from diffusers_mixdq.apply import quantized_layers
from diffusers_mixdq.cli import app
from diffusers_mixdq.hub import PlanPushError, pipeline_quantization_config, push_plan

TOKEN = "hf_loopback_test_token"

#: int8 / float8 only: int4 / int2 would compile quanto's C++ extension on first use
PLAN = BitPlan(
    target={"base_model": "tiny/sd-unet"},
    defaults={"weights": "int8", "activations": "int8", "act_range": "dynamic"},
    rules=[{"targets": ["*.resnets.*.conv1"], "weights": "float8", "note": "robust convs"}],
    ignore=["conv_in", "conv_out"],
    provenance={"tool": "tests", "budget": {"weight_bits": 8.0}},
)
PLAN_B = BitPlan.uniform("float8", ignore=["conv_in", "conv_out", "time_embedding.*"])


@pytest.fixture(scope="module")
def resolved() -> BitPlan:
    return PLAN.resolve(make_unet())


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hub_session(tmp_path_factory):
    """The loopback hub, with huggingface_hub pointed at it and a private HF_HOME / cache (undone after this
    module)."""
    from huggingface_hub import constants, hf_api

    server = LoopbackHub(tokens={TOKEN: "tester", "hf_other_user_token": "someone"})
    server.start()
    home = tmp_path_factory.mktemp("hf_home")
    mp = pytest.MonkeyPatch()
    for key, value in {
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN": TOKEN,
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }.items():
        mp.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
        mp.delenv(key, raising=False)
    # import-time constants: the endpoint, its URL template, and every path derived from HF_HOME
    old_home = constants.HF_HOME
    for name in dir(constants):
        value = getattr(constants, name)
        if name.isupper() and isinstance(value, str) and value.startswith(old_home + "/"):
            mp.setattr(constants, name, str(home) + value[len(old_home) :])
    mp.setattr(constants, "HF_HOME", str(home))
    mp.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    mp.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    mp.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    mp.setattr(constants, "ENDPOINT", server.url)
    mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    mp.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
    mp.setattr(constants, "HF_HUB_OFFLINE", False)
    mp.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    mp.setattr(hf_api.api, "endpoint", server.url)  # module-level HfApi behind create_repo / upload_folder / ...
    yield server
    mp.undo()
    server.stop()


@pytest.fixture
def hub(hub_session):
    """The module's hub; every request of the test must have been understood (no unknown endpoint, no crash)."""
    hub_session.clear_assertions()
    hub_session.clear_handler_errors()
    yield hub_session
    hub_session.check()


@pytest.fixture
def repo_id(request) -> str:
    """A repo id unique to the test (so tests never share Hub repos or cache entries)."""
    return "tester/" + re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-.")[:90]


def cache_folder(repo_id: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))


def assert_cache_clean(repo_id: str) -> None:
    """Every blob of the repo's cache matches its name (its ETag), and no snapshot entry dangles."""
    folder = cache_folder(repo_id)
    for blob in (folder / "blobs").glob("*"):
        if blob.name.endswith(".incomplete") or not blob.is_file():
            continue
        data = blob.read_bytes()
        assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == blob.name, f"corrupt blob {blob}"
    for entry in (folder / "snapshots").rglob("*"):
        if entry.is_symlink():
            assert entry.exists(), f"dangling cache entry {entry}"


def as_published(plan: BitPlan) -> BitPlan:
    """``plan`` without the download record (``provenance["source"]``) that loading from the Hub adds."""
    plan = plan.copy()
    plan.provenance.pop("source", None)
    return plan


def run_unet(model) -> torch.Tensor:
    x, t, e = unet_inputs()
    with torch.no_grad():
        return model(x, t, e).sample


def load_unet(path, **config) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(path, quantization_config=MixDQConfig(**config))


# ---------------------------------------------------------------------------------------------- push and load
def test_push_then_load_by_repo_id_is_identical(hub, repo_id, unet_dir, resolved, tmp_path):
    marker = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    plan = resolved.copy()
    plan.tensors = {"test.marker": marker}
    info = push_plan(plan, repo_id, component="unet")
    assert re.fullmatch(r"[0-9a-f]{40}", info.oid)

    files = hub.repo_files(repo_id)
    assert set(files) == {".gitattributes", "README.md", "unet/plan.json", "unet/plan.safetensors"}
    plan.save(tmp_path / "local")
    assert files["unet/plan.json"] == (tmp_path / "local" / "plan.json").read_bytes()
    commits = [c for c in hub.repos[repo_id].history(info.oid)]
    assert len(commits) == 2 and commits[0].title == "Upload MixDQ plan"  # plan + card: one commit

    from_hub = load_unet(unet_dir, plan=repo_id, subfolder="unet")
    local = load_unet(unet_dir, plan=tmp_path / "local")
    assert quantized_layers(from_hub) == quantized_layers(local)
    assert quantized_layers(from_hub)["down_blocks.0.resnets.0.conv1"] == ("float8", "int8")
    assert quantized_layers(from_hub)["conv_in"] == ("none", "none")
    assert torch.equal(run_unet(from_hub), run_unet(local))

    carried = from_hub.config.quantization_config
    assert carried.plan.provenance["source"] == {
        "repo_id": repo_id, "revision": "main", "commit": info.oid, "subfolder": "unet"
    }
    assert carried.plan.provenance["tool"] == "tests"
    saved = json.loads(carried.to_json_string())
    assert saved["plan_source"] == repo_id and saved["subfolder"] == "unet"
    assert saved["plan"]["provenance"]["source"]["commit"] == info.oid
    # the sidecar came along, bit for bit
    assert torch.equal(MixDQConfig(plan=repo_id, subfolder="unet").plan.tensors["test.marker"], marker)
    assert_cache_clean(repo_id)


def test_model_card(hub, repo_id, resolved):
    from huggingface_hub import ModelCard

    push_plan({"unet": resolved, "transformer": PLAN_B}, repo_id)
    card = ModelCard.load(repo_id)
    assert card.data.base_model == "tiny/sd-unet"
    assert card.data.library_name == "diffusers"
    assert {"mixdq", "quantization", "diffusers"} <= set(card.data.tags)
    assert card.data.to_dict()["base_model_relation"] == "quantized"
    summary = resolved.summary()
    text = card.text
    assert f"| average weight bits (parameter-weighted) | {summary.avg_weight_bits:.2f} |" in text
    assert f"| layers by weight dtype | float8: {summary.weight_layers['float8']}, int8: " in text
    assert f"({summary.ratio_vs_fp16:.2f}x smaller)" in text
    assert '"weight_bits": 8.0' in text  # provenance
    # the rule-based plan shows its rules instead of a summary
    assert "This plan is rule-based" in text and "`time_embedding.*`" in text
    assert f'pipeline_quantization_config("{repo_id}")' in text
    # the server's repo info reads the same metadata back
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id)
    assert info.card_data["library_name"] == "diffusers" and "mixdq" in info.tags
    # the card is deterministic: pushing the same plans again changes nothing
    head = hub.repos[repo_id].branches["main"]
    push_plan({"unet": resolved, "transformer": PLAN_B}, repo_id)
    assert hub.repos[repo_id].branches["main"] == head


def test_revision_pinning(hub, repo_id):
    from huggingface_hub import HfApi

    first = push_plan(PLAN, repo_id).oid
    HfApi().create_tag(repo_id, tag="v1", revision=first)
    second = push_plan(PLAN_B, repo_id).oid
    on_dev = push_plan(BitPlan.uniform("int8"), repo_id, revision="dev").oid
    assert len({first, second, on_dev}) == 3

    def plan_at(revision):
        plan = MixDQConfig(plan=repo_id, revision=revision).plan
        return plan.defaults["weights"], plan.provenance["source"]

    assert plan_at(None) == ("float8", {"repo_id": repo_id, "revision": "main", "commit": second, "subfolder": None})
    assert plan_at(first) == ("int8", {"repo_id": repo_id, "revision": first, "commit": first, "subfolder": None})
    assert plan_at("v1") == ("int8", {"repo_id": repo_id, "revision": "v1", "commit": first, "subfolder": None})
    assert plan_at("dev")[0] == "int8" and plan_at("dev")[1]["commit"] == on_dev
    assert hub.repo_files(repo_id, "dev").keys() == hub.repo_files(repo_id, "main").keys()
    with pytest.raises(PlanSourceError, match="has no revision 'nope'"):
        MixDQConfig(plan=repo_id, revision="nope")


def test_offline_mode_uses_the_cache(hub, repo_id, monkeypatch):
    from huggingface_hub import constants

    plan = PLAN.copy()
    plan.tensors = {"test.marker": torch.ones(3)}
    commit = push_plan(plan, repo_id, component="unet").oid
    online = MixDQConfig(plan=repo_id, subfolder="unet").plan
    pipeline_quantization_config(repo_id)  # caches the plan listing too

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub.log)
    offline = MixDQConfig(plan=repo_id, subfolder="unet").plan
    mapping = pipeline_quantization_config(repo_id).quant_mapping
    assert len(hub.log) == before, "offline mode made HTTP requests"
    assert offline == online and offline.provenance["source"]["commit"] == commit
    assert torch.equal(offline.tensors["test.marker"], torch.ones(3))
    assert set(mapping) == {"unet"} and mapping["unet"].plan == online
    with pytest.raises(PlanSourceError, match="HF_HUB_OFFLINE is set and 'plan.json' of Hub repo 'tester/never-"):
        MixDQConfig(plan="tester/never-downloaded")
    with pytest.raises(PlanSourceError, match="HF_HUB_OFFLINE is set"):
        pipeline_quantization_config("tester/never-downloaded")
    with pytest.raises(PlanPushError, match="HF_HUB_OFFLINE is set"):
        push_plan(PLAN, repo_id)


# ---------------------------------------------------------------------------------------------- pipelines
def test_pipeline_one_liner(hub, repo_id, pipeline_dir, resolved):
    push_plan({"unet": resolved}, repo_id)
    qconfig = pipeline_quantization_config(repo_id)
    assert set(qconfig.quant_mapping) == {"unet"}
    pipe = DiffusionPipeline.from_pretrained(pipeline_dir, quantization_config=qconfig)
    expected = {n: (s.weights, s.activations) for n, s in resolved.layer_specs().items()}
    assert quantized_layers(pipe.unet) == expected
    source = pipe.unet.config.quantization_config.plan.provenance["source"]
    assert source["commit"] == hub.repos[repo_id].branches["main"] and source["revision"] == "main"
    assert source["subfolder"] == "unet"


def test_root_plan_maps_to_its_component(hub, repo_id):
    push_plan(PLAN.resolve(make_unet()), repo_id)  # root level, target.class_name = UNet2DConditionModel
    mapping = pipeline_quantization_config(repo_id).quant_mapping
    assert set(mapping) == {"unet"} and mapping["unet"].subfolder is None

    push_plan(PLAN, repo_id)  # rule-based, no class: the component must be named
    with pytest.raises(PlanSourceError, match="root_component='unet'"):
        pipeline_quantization_config(repo_id)
    assert set(pipeline_quantization_config(repo_id, root_component="unet").quant_mapping) == {"unet"}
    with pytest.raises(PlanSourceError, match="has no plan for vae"):
        pipeline_quantization_config(repo_id, root_component="unet", components=["vae"])


def test_plan_for_another_model_is_refused_at_load(hub, repo_id, unet_dir, pipeline_dir):
    other = BitPlan.uniform("int8").resolve(make_unet(cross_attention_dim=48))
    other.target["base_model"] = "someone/bigger-model"
    push_plan({"unet": other}, repo_id)
    with pytest.raises(PlanMismatchError, match="another architecture.*someone/bigger-model") as err:
        load_unet(unet_dir, plan=repo_id, subfolder="unet")
    assert isinstance(err.value, MixDQError)
    with pytest.raises(MixDQError, match="another architecture"):
        DiffusionPipeline.from_pretrained(pipeline_dir, quantization_config=pipeline_quantization_config(repo_id))


@pytest.mark.slow  # a fresh Python process imports torch and diffusers
def test_quantized_unet_push_to_hub_reloads_with_only_import(hub, repo_id, unet_dir, tmp_path):
    model = load_unet(unet_dir, plan=PLAN)
    model.save_pretrained(str(tmp_path / "q"), push_to_hub=True, repo_id=repo_id, token=TOKEN)
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md"} <= set(hub.repo_files(repo_id))
    torch.save(run_unet(model), tmp_path / "expected.pt")
    # a fresh process: huggingface_hub reads HF_ENDPOINT / HF_HOME from the environment the fixture set
    code = (
        "import sys, torch, diffusers_mixdq\n"
        "from diffusers import UNet2DConditionModel\n"
        "sys.path.insert(0, 'tests')\n"
        "from conftest import unet_inputs\n"
        f"m = UNet2DConditionModel.from_pretrained({repo_id!r})\n"
        "x, t, e = unet_inputs()\n"
        "with torch.no_grad():\n"
        "    out = m(x, t, e).sample\n"
        f"assert torch.equal(out, torch.load(r'{tmp_path / 'expected.pt'}')), 'outputs differ'\n"
        "print('layers', len(m.config.quantization_config.plan.layers))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"layers {len(PLAN.resolve(make_unet()).layers)}" in result.stdout


def test_quantized_pipeline_push_to_hub_reloads(hub, repo_id, pipeline_dir, tmp_path):
    from diffusers.quantizers import PipelineQuantizationConfig

    pipe = DiffusionPipeline.from_pretrained(
        pipeline_dir, quantization_config=PipelineQuantizationConfig(quant_mapping={"unet": MixDQConfig(plan=PLAN)})
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(str(tmp_path / "q"), push_to_hub=True, repo_id=repo_id, token=TOKEN)
    assert "unet/config.json" in hub.repo_files(repo_id)
    again = DiffusionPipeline.from_pretrained(repo_id)
    again.set_progress_bar_config(disable=True)
    assert quantized_layers(again.unet) == quantized_layers(pipe.unet)

    def images(p):
        return p("a red circle", num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0), output_type="np").images

    assert np.array_equal(images(again), images(pipe))


# ---------------------------------------------------------------------------------------------- publishing
def test_cli_push(hub, repo_id, tmp_path, resolved):
    plan_dir = tmp_path / "plans"
    resolved.save(plan_dir / "unet")
    PLAN_B.save(plan_dir / "transformer")
    runner = CliRunner()
    result = runner.invoke(app, ["push", str(plan_dir), repo_id, "--private", "--revision", "dev",
                                 "--commit-message", "first plans"])
    assert result.exit_code == 0, result.output
    repo = hub.repos[repo_id]
    assert repo.private
    head = repo.commits[repo.branches["dev"]]
    assert head.oid in result.output and head.title == "first plans"
    assert {"unet/plan.json", "transformer/plan.json", "README.md"} <= set(head.files)
    assert set(hub.repo_files(repo_id, "main")) == {".gitattributes"}  # only dev got the plans

    # pushing a directory with a root plan only: the stale component plans go, in the same single commit
    PLAN.save(tmp_path / "root")
    result = runner.invoke(app, ["push", str(tmp_path / "root"), repo_id, "--revision", "dev"])
    assert result.exit_code == 0, result.output
    files = hub.repo_files(repo_id, "dev")
    assert "plan.json" in files and "unet/plan.json" not in files and "transformer/plan.json" not in files
    assert len(repo.history(repo.branches["dev"])) == 3

    # private: invisible without the owner's token
    with pytest.raises(PlanSourceError, match="private or gated, pass token="):
        MixDQConfig(plan=repo_id, revision="dev", token=False)
    assert as_published(MixDQConfig(plan=repo_id, revision="dev").plan) == PLAN

    # errors are reported, not raised
    result = runner.invoke(app, ["push", str(tmp_path / "root"), "someone/not-mine"])
    assert result.exit_code == 2 and "error:" in result.output and "HTTP 403" in result.output
    result = runner.invoke(app, ["push", str(tmp_path / "nothing-here"), repo_id])
    assert result.exit_code == 2 and "No plan at" in result.output


def test_push_refuses_invalid_plans_before_uploading(hub, repo_id, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "plan.json").write_text('{"format": "diffusers-mixdq-plan", "version": 1, '
                                               '"defaults": {"weights": "int7"}}')
    before = len(hub.log)
    with pytest.raises(MixDQError, match="unknown weight dtype 'int7'"):
        push_plan(tmp_path / "bad", repo_id)
    assert len(hub.log) == before
    with pytest.raises(PlanPushError, match="HTTP 401.*hf auth login"):
        push_plan(PLAN, repo_id, token="hf_not_a_real_token")


# ---------------------------------------------------------------------------------------------- errors
def test_repo_ids_and_local_paths(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    PLAN.save(tmp_path / "plans" / "w8")
    assert mixdq_hub.looks_like_repo_id("user/repo")
    assert not mixdq_hub.looks_like_repo_id("plans/w8")  # an existing local directory
    assert not mixdq_hub.looks_like_repo_id("a/b/c") and not mixdq_hub.looks_like_repo_id("plans/plan.json")
    assert not mixdq_hub.looks_like_repo_id("user/re po")
    before = len(hub.log)
    assert MixDQConfig(plan="plans/w8").plan == PLAN  # an existing local path never goes to the Hub
    assert len(hub.log) == before
    with pytest.raises(PlanSourceError, match="not a local file or directory, and the Hub at http://127.0.0.1"):
        MixDQConfig(plan="tester/no-such-repo")
    with pytest.raises(PlanSourceError, match="No plan found at 'plans/missing.json'"):
        MixDQConfig(plan="plans/missing.json")


def test_missing_files_name_what_exists(hub, repo_id):
    push_plan({"unet": PLAN}, repo_id)
    with pytest.raises(PlanSourceError, match=r"has no 'plan.json'\. It has plans for: subfolder='unet'"):
        MixDQConfig(plan=repo_id)
    with pytest.raises(PlanSourceError, match="has no 'transformer/plan.json'"):
        MixDQConfig(plan=repo_id, subfolder="transformer")
    hub.put_files("tester/not-a-plan-repo", {"config.json": b"{}"})
    with pytest.raises(PlanSourceError, match="holds no plan at all"):
        MixDQConfig(plan="tester/not-a-plan-repo")
    with pytest.raises(PlanSourceError, match="holds no plan at all"):
        pipeline_quantization_config("tester/not-a-plan-repo")
    # a plan whose sidecar is missing
    data = json.loads(PLAN.to_json())
    data["tensors"] = "plan.safetensors"
    hub.put_files(repo_id, {"plan.json": json.dumps(data).encode()})
    with pytest.raises(PlanSourceError, match="names the tensor sidecar 'plan.safetensors', but the repository has"):
        MixDQConfig(plan=repo_id)


def test_broken_plan_in_repo(hub, repo_id):
    bad_commit = hub.put_files(repo_id, {"plan.json": b'{"format": "diffusers-mixdq-plan", "version": 1,,}'})
    with pytest.raises(PlanSourceError, match=r"'plan.json' of Hub repo .* is not a valid diffusers-mixdq plan: .*"
                                              r"not valid JSON") as err:
        MixDQConfig(plan=repo_id)
    assert bad_commit[:12] in str(err.value)
    assert not (cache_folder(repo_id) / "snapshots" / bad_commit / "plan.json").exists()  # not left in the cache
    hub.put_files(repo_id, {"plan.json": json.dumps({"format": "diffusers-mixdq-plan", "version": 9}).encode()})
    with pytest.raises(PlanSourceError, match="Upgrade diffusers-mixdq"):
        MixDQConfig(plan=repo_id)
    good = push_plan(PLAN, repo_id).oid
    assert MixDQConfig(plan=repo_id).plan.provenance["source"]["commit"] == good
    with pytest.raises(PlanSourceError, match="not valid JSON"):  # the broken commit stays broken, pinned
        MixDQConfig(plan=repo_id, revision=bad_commit)
    assert_cache_clean(repo_id)


def test_corrupted_download_is_caught_and_not_cached(hub, repo_id):
    plan = PLAN.copy()
    plan.tensors = {"test.marker": torch.arange(4.0)}
    push_plan(plan, repo_id)
    with hub.fault(corrupt=True, methods=("GET",), match="plan.json"):
        with pytest.raises(PlanSourceError, match="download of 'plan.json' .* is corrupted.*removed from the cache"):
            MixDQConfig(plan=repo_id)
    assert_cache_clean(repo_id)
    assert not list((cache_folder(repo_id) / "snapshots").rglob("plan.json"))
    with hub.fault(corrupt=True, methods=("GET",), match="plan.safetensors"):
        with pytest.raises(PlanSourceError, match="download of 'plan.safetensors' .* is corrupted"):
            MixDQConfig(plan=repo_id)
    assert_cache_clean(repo_id)
    loaded = MixDQConfig(plan=repo_id).plan  # the fault is gone: a clean download works
    assert as_published(loaded) == plan and torch.equal(loaded.tensors["test.marker"], torch.arange(4.0))
    assert_cache_clean(repo_id)


def test_server_errors(hub, repo_id):
    push_plan({"unet": PLAN}, repo_id)
    with hub.fault(status=500):  # the Hub is down (the client retries; Retry-After: 0 keeps that fast)
        with pytest.raises(PlanSourceError, match=r"could not be reached or failed \(HTTP 500\).*no cached copy"):
            MixDQConfig(plan=repo_id, subfolder="unet")
        with pytest.raises(PlanSourceError, match=r"the plans of Hub repo .* could not be reached or failed \(HTTP 500"):
            pipeline_quantization_config(repo_id)
        with pytest.raises(PlanPushError, match="HTTP 500"):
            push_plan(PLAN, repo_id)
    with hub.fault(status=503, methods=("GET",), match="resolve"):  # metadata fine, download fails
        with pytest.raises(PlanSourceError, match="answered HTTP 503 while downloading 'unet/plan.json'"):
            MixDQConfig(plan=repo_id, subfolder="unet")
    assert not list((cache_folder(repo_id) / "snapshots").rglob("plan.json"))
    assert as_published(MixDQConfig(plan=repo_id, subfolder="unet").plan) == PLAN  # recovered
    assert_cache_clean(repo_id)


def test_mixdq_build_push(hub, repo_id, pipeline_dir, tmp_path):
    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "pipeline": str(pipeline_dir), "prompts": ["a red circle"], "steps": 1, "guidance": 1.0, "resolution": 32,
        "weights": {"budget_bits": 8.0, "candidates": {"content": [8], "quality": [8]}},
    }))
    result = CliRunner().invoke(app, ["build", str(recipe), "--out", str(tmp_path / "out"), "--push", repo_id])
    assert result.exit_code == 0, result.output
    assert {"unet/plan.json", "unet/plan.safetensors", "README.md"} <= set(hub.repo_files(repo_id, "main"))
    built = BitPlan.load(tmp_path / "out" / "unet")
    assert as_published(MixDQConfig(plan=repo_id, subfolder="unet").plan) == built


def test_readme_hub_commands_run_as_written(hub, tmp_path, monkeypatch):
    """The README's push command and Hub one-liners, run against the loopback hub (owner namespace adapted)."""
    import shlex

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    repo_root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(repo_root)
    push_line = next(line for line in readme.splitlines() if line.startswith(".venv/bin/mixdq push "))
    args = [a.replace("you/", "tester/") for a in shlex.split(push_line)[1:]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    snippet = readme.split("### Plans on the Hugging Face Hub", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {"UNet2DConditionModel": UNet2DConditionModel, "DiffusionPipeline": DiffusionPipeline,
                 "MixDQConfig": MixDQConfig, "base": "diffusers_mixdq/demo/pipeline"}
    exec(snippet.replace("you/", "tester/"), namespace)
    local = UNet2DConditionModel.from_pretrained(namespace["base"], subfolder="unet",
                                                 quantization_config=MixDQConfig(plan=args[1]))
    expected = quantized_layers(local)  # the plan the README pushes, applied from the local directory
    assert any(w != "none" for w, _ in expected.values())
    assert quantized_layers(namespace["unet"]) == expected
    assert quantized_layers(namespace["pipe"].unet) == expected
    assert namespace["pipe"].unet.config.quantization_config.plan.provenance["source"]["repo_id"] == \
        "tester/shapes-mixdq"


def test_cache_checks_lfs_files_by_sha256_and_evicts_them(tmp_path, monkeypatch):
    """LFS files are cached under their sha256 (the test Hub serves git blobs only): the same check applies."""
    from huggingface_hub import constants

    from diffusers_mixdq.hub.cache import commit_of, verify

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    data, commit = b"tensor bytes", "c" * 40
    repo = tmp_path / "models--tester--lfs"
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    entry = repo / "snapshots" / commit / "unet" / "plan.safetensors"
    blob.parent.mkdir(parents=True)
    entry.parent.mkdir(parents=True)
    blob.write_bytes(data)
    entry.symlink_to(Path("..", "..", "..", "blobs", blob.name))
    assert commit_of(str(entry), "unet/plan.safetensors") == commit
    verify(str(entry), "the sidecar")  # intact: no error, nothing removed
    assert entry.exists() and blob.exists()

    blob.write_bytes(b"tensor bytez")  # same length, other content
    with pytest.raises(PlanSourceError, match="the sidecar is corrupted.*removed from the cache"):
        verify(str(entry), "the sidecar")
    assert not entry.is_symlink() and not blob.exists()


def test_inspect_a_hub_plan_in_a_component_folder(hub, repo_id, resolved):
    """`mixdq inspect user/repo --subfolder unet` reads the plan of that component folder (issue #18); without it,
    the error names the folders the repo has plans in."""
    push_plan({"unet": resolved}, repo_id)
    shown = CliRunner().invoke(app, ["inspect", repo_id, "--subfolder", "unet"])
    assert shown.exit_code == 0, shown.output
    assert f"{resolved.summary().avg_weight_bits:.2f}" in shown.output
    missing = CliRunner().invoke(app, ["inspect", repo_id])
    assert missing.exit_code == 2 and "subfolder='unet'" in " ".join(missing.output.split())


# ---------------------------------------------------------------------------------------------- issue #17: the cache
def test_interrupted_download_leaves_nothing_that_loads(hub, repo_id, monkeypatch):
    """A download killed half-way (Ctrl-C) leaves no cache entry: offline it is "not cached", online it downloads."""
    from huggingface_hub import constants, file_download

    plan = PLAN.copy()
    plan.tensors = {"test.marker": torch.arange(6.0)}
    push_plan(plan, repo_id)
    real_get = file_download.http_get

    def interrupted(url, temp_file, **kwargs):
        temp_file.write(b'{"format": "diffusers-mixdq-plan", "ver')  # half a file, then the user presses Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(file_download, "http_get", interrupted)
    with pytest.raises(KeyboardInterrupt):
        MixDQConfig(plan=repo_id)
    assert not [p for p in (cache_folder(repo_id) / "snapshots").rglob("*") if p.is_file()]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PlanSourceError, match="HF_HUB_OFFLINE is set"):
        MixDQConfig(plan=repo_id)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(file_download, "http_get", real_get)
    loaded = MixDQConfig(plan=repo_id).plan
    assert as_published(loaded) == plan and torch.equal(loaded.tensors["test.marker"], torch.arange(6.0))
    assert_cache_clean(repo_id)


def test_cache_entry_corrupted_on_disk_never_loads_offline(hub, repo_id, monkeypatch):
    """A cached plan whose bytes changed on disk is refused (and evicted) even offline; the next online load
    downloads it again, and offline loads of the good copy then work."""
    from huggingface_hub import constants

    push_plan(PLAN, repo_id)
    MixDQConfig(plan=repo_id)
    entry = next((cache_folder(repo_id) / "snapshots").rglob("plan.json"))
    blob = entry.resolve()
    blob.write_bytes(blob.read_bytes().replace(b'"int8"', b'"int4"', 1))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PlanSourceError, match="is corrupted.*removed from the cache"):
        MixDQConfig(plan=repo_id)
    assert not entry.exists()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert as_published(MixDQConfig(plan=repo_id).plan) == PLAN
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub.log)
    assert as_published(MixDQConfig(plan=repo_id).plan) == PLAN
    assert len(hub.log) == before
    assert_cache_clean(repo_id)


def test_offline_loads_a_previously_used_plan_into_a_model(hub, repo_id, unet_dir, monkeypatch):
    from huggingface_hub import constants

    push_plan(PLAN, repo_id)
    online = load_unet(unet_dir, plan=repo_id)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub.log)
    offline = load_unet(unet_dir, plan=repo_id)
    assert len(hub.log) == before
    assert quantized_layers(offline) == quantized_layers(online)
    assert torch.equal(run_unet(offline), run_unet(online))


def test_bos_sidecar_of_a_hub_plan_is_hash_checked(hub, repo_id):
    from safetensors.torch import save as save_bytes

    from diffusers_mixdq.bos import attach_bos
    from diffusers_mixdq.plan import BOS_STATE_KEY

    plan = attach_bos(PLAN, torch.randn(32))
    push_plan(plan, repo_id)
    assert torch.equal(MixDQConfig(plan=repo_id).plan.tensors[BOS_STATE_KEY], plan.tensors[BOS_STATE_KEY])
    hub.put_files(repo_id, {"plan.safetensors": save_bytes({BOS_STATE_KEY: torch.randn(32)})})
    with pytest.raises(PlanSourceError, match=r"(?s)sha256 .* is not the one the plan records.*broken plan"):
        MixDQConfig(plan=repo_id)


def test_plan_set_on_the_hub_picks_per_component(hub, repo_id, resolved):
    """A repo with plans only in component folders: MixDQConfig(plan=repo) reads them all (one commit) and each
    model picks its own, so PipelineQuantizationConfig(quant_backend="mixdq", quant_kwargs={"plan": repo}) works."""
    push_plan({"unet": resolved, "text_encoder": BitPlan.uniform("int8")}, repo_id)
    config = MixDQConfig(plan=repo_id)
    assert config.components == ["text_encoder", "unet"]
    unet = config.for_component("unet", "UNet2DConditionModel")
    assert unet.plan.target["class_name"] == "UNet2DConditionModel"
    commits = {config.for_component(c, "").plan.provenance["source"]["commit"] for c in config.components}
    assert len(commits) == 1
    with pytest.raises(MixDQError, match="no plan for the pipeline component 'vae'"):
        config.for_component("vae", "AutoencoderKL")
