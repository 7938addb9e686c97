"""Publishing on the Hub, against the Hub-compatible test server in hub_server.py on 127.0.0.1:
credentials checked before training, an allow-listed upload, background pushes, the card in the repo,
and loading the pushed repo back through HF_ENDPOINT (ours and plain diffusers)."""

import contextlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import markdown
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

from ddpm_hf.publishing.hub import HubError, HubPusher, files_to_upload, push_output_folder
from ddpm_hf.publishing.model_card import reproduce_command, TAGS
from ddpm_hf.recipes.resolve import resolve_config
from ddpm_hf.training.loop import train

sys.path.insert(0, str(Path(__file__).parent))
from common import TINY, launch_two
from hub_server import LocalHub  # noqa: E402

WRITE_TOKEN = "hf_testWriteToken0123456789abcdefXYZ"
READ_TOKEN = "hf_testReadToken0123456789abcdefXYZ"
REPO = "alice/ddpm-digits"
# what a finished run pushes, besides the .gitattributes every Hub repo starts with
PUSHED = {"README.md", "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
          "scheduler/scheduler_config.json", "samples.png", "samples/step-0000001.png", "samples/step-0000002.png",
          "training_config.json", "loss_curve.png", "progressive.png", "figures.json"}


def animation(out: Path) -> str:
    """The card's denoising animation: GIF or WebP, whichever was smaller."""
    (found,) = [p.name for p in out.glob("denoising.*")]
    return found


@contextlib.contextmanager
def hub_endpoint(mp: pytest.MonkeyPatch, endpoint: str, tmp: Path):
    """Point huggingface_hub (in this process) at `endpoint`, with no token from the environment or a login."""
    from huggingface_hub import constants

    mp.setattr(constants, "ENDPOINT", endpoint)
    mp.setattr(constants, "HF_TOKEN_PATH", str(tmp / "no-login-token"))
    mp.delenv("HF_TOKEN", raising=False)
    mp.setenv("HF_HUB_OFFLINE", "0")
    mp.setattr(constants, "HF_HUB_OFFLINE", False)
    yield


def subprocess_env(hub: LocalHub, home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
    return {**env, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1", **extra}


@pytest.fixture(scope="module")
def hub():
    with LocalHub({WRITE_TOKEN: ("alice", "write"), READ_TOKEN: ("bob", "read")}) as server:
        yield server


@pytest.fixture
def at_hub(hub, tmp_path, monkeypatch):
    with hub_endpoint(monkeypatch, hub.endpoint, tmp_path):
        yield hub


@pytest.fixture(scope="module")
def pushed_run(hub, tmp_path_factory):
    """A tiny run trained with --push_to_hub --hub_push_every 1; returns (output folder, everything it printed or logged)."""
    from accelerate.state import AcceleratorState

    out = tmp_path_factory.mktemp("pushed-run")
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    stream = io.StringIO()
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.MonkeyPatch.context() as mp, hub_endpoint(mp, hub.endpoint, tmp_path_factory.mktemp("home")):
        root, level = logging.getLogger(), logging.getLogger().level
        root.addHandler(handler)
        root.setLevel(logging.DEBUG)  # everything any library logs
        try:
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                train(resolve_config({**TINY, "preset": "digits-cpu", "max_train_steps": 2, "checkpointing_steps": 2,
                                      "save_images_steps": 1, "report_to": "tensorboard", "output_dir": str(out),
                                      "push_to_hub": True, "hub_model_id": "ddpm-digits", "hub_push_every": 1}),
                      hub_token=WRITE_TOKEN)
        finally:
            root.removeHandler(handler)
            root.setLevel(level)
            AcceleratorState._reset_state(reset_partial_state=True)
    return out, stream.getvalue() + "\n".join(records)


# ---------------------------------------------------------------- what goes up


def test_allow_list_picks_only_published_files(tmp_path):
    wanted = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
              "scheduler/scheduler_config.json", "README.md", "samples.png", "samples/step-0000400.png",
              "metrics.json", "training_config.json", "loss_curve.png", "progressive.png", "denoising.gif",
              "denoising.webp", "figures.json", "metrics-dinov2.json"]
    unwanted = ["checkpoint-0000400/unet.safetensors", "checkpoint-0000400/optimizer.pt", "checkpoint-0000400/trainer_state.json",
                "best_checkpoint/ema.safetensors", "logs/events.out.tfevents.1", "train_summary.json", "optimizer.pt",
                "unet/diffusion_pytorch_model.bin", ".samples.png.tmp-1234", ".hub-push.tmp-abcd/model_index.json",
                "samples/notes.txt", "samples/checkpoint-0000400/step-0000400.png"]
    for rel in wanted + unwanted:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert files_to_upload(tmp_path) == sorted(wanted)


@pytest.mark.slow
def test_training_push_uploads_exactly_the_allow_list(pushed_run, hub):
    out, _ = pushed_run
    files = hub.files(REPO)
    assert set(files) == PUSHED | {".gitattributes", animation(out)}
    for rel in PUSHED | {animation(out)}:
        assert files[rel] == (out / rel).read_bytes(), rel
    # what stayed home
    assert list(out.glob("checkpoint-*/optimizer.pt")) and (out / "logs").is_dir() and (out / "train_summary.json").is_file()
    assert not list(out.glob(".hub-push*")), "the upload snapshot is removed after the push"


@pytest.mark.slow
def test_the_weights_go_through_the_hubs_lfs_path_as_for_users(pushed_run, hub):
    """Each .safetensors is uploaded as the Hub takes large files: an LFS object (batch, PUT, verify), committed by its
    SHA-256; the card and configs go inline."""
    import hashlib

    out, _ = pushed_run
    files, lfs = hub.files(REPO), hub.lfs_files(REPO)
    assert lfs and lfs == sorted(p for p in files if p.endswith(".safetensors"))
    for path in lfs:
        digest = hashlib.sha256((out / path).read_bytes()).hexdigest()
        assert digest in hub.lfs_verified and hub.lfs[digest] == files[path] == (out / path).read_bytes(), path
    assert "README.md" not in lfs and "model_index.json" not in lfs


def test_push_every_n_steps_commits_the_pipeline_so_far(pushed_run, hub):
    commits = hub.repos[REPO].commits
    assert [c.message for c in commits] == ["initial commit", "Training step 1 of 2", "End of training: step 2"]
    mid = commits[1].files
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "samples.png"} <= set(mid)
    assert "Training in progress: step 1 of 2" in mid["README.md"].decode()
    assert "Training in progress" not in commits[2].files["README.md"].decode()
    assert mid["unet/diffusion_pytorch_model.safetensors"] != commits[2].files["unet/diffusion_pytorch_model.safetensors"]
    assert not hub.repos[REPO].private


def test_pushed_card_metadata_and_image_links(pushed_run, hub):
    files = hub.files(REPO)
    card = ModelCard(files["README.md"].decode())
    assert card.data.license == "apache-2.0" and card.data.library_name == "diffusers"
    assert set(TAGS) <= set(card.data.tags)
    html = markdown.markdown(card.text, extensions=["fenced_code"]).replace("&quot;", '"')
    sources = re.findall(r'<img[^>]*src="([^"]+)"', html)
    out, _ = pushed_run
    assert sorted(sources) == sorted([animation(out), "loss_curve.png", "progressive.png", "samples.png"])
    assert set(sources) <= set(files)
    assert f'DDPMPipeline.from_pretrained("{REPO}")' in html
    assert "push_to_hub" not in re.search(r"```bash\n(.*?)\n```", card.text, re.S).group(1), "a reproduction pushes nowhere"


def test_token_is_never_written_or_printed(pushed_run):
    out, printed = pushed_run
    assert "Will push to" in printed  # the capture works
    assert WRITE_TOKEN not in printed
    for path in out.rglob("*"):
        if path.is_file():
            assert WRITE_TOKEN.encode() not in path.read_bytes(), path
    assert not any("token" in key for key in json.loads((out / "training_config.json").read_text()))


LOAD_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, torch, diffusers, ddpm_hf
    repo, target = sys.argv[1], sys.argv[2]
    def draw(pipe):
        gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
        return pipe(batch_size=2, generator=gens, num_inference_steps=10, output_type="np").images
    ours = ddpm_hf.DDPMPipeline.from_pretrained(repo)
    plain = diffusers.DDPMPipeline.from_pretrained(repo)
    np.savez(target, ours=draw(ours), plain=draw(plain), ours_scheduler=type(ours.scheduler).__module__,
             plain_scheduler=type(plain.scheduler).__module__)
""")


@pytest.mark.slow
def test_from_pretrained_via_hf_endpoint_gives_the_local_images_and_loads_in_plain_diffusers(pushed_run, hub, tmp_path):
    from ddpm_hf import DDPMPipeline

    out, _ = pushed_run
    result = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, REPO, str(tmp_path / "images.npz")],
                            env=subprocess_env(hub, tmp_path / "hf-home"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = np.load(tmp_path / "images.npz")
    local = DDPMPipeline.from_pretrained(out)
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    expected = local(batch_size=2, generator=gens, num_inference_steps=10, output_type="np").images
    assert str(loaded["ours_scheduler"]) == "ddpm_hf.diffusion.scheduler"
    assert str(loaded["plain_scheduler"]).startswith("diffusers.")
    np.testing.assert_array_equal(loaded["ours"], expected)
    # diffusers' own scheduler computes its tables in float32: the same images to float32 rounding
    np.testing.assert_allclose(loaded["plain"], expected, atol=1e-3)
    assert (tmp_path / "hf-home" / "hub" / "models--alice--ddpm-digits").is_dir(), "downloaded into the HF cache"


# ---------------------------------------------------------------- failing early and clearly


@pytest.mark.slow
def test_missing_token_fails_before_the_first_training_step(at_hub, tmp_path, monkeypatch, capsys):
    from ddpm_hf.commands import train as train_command
    from ddpm_hf.training import loop as training

    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded before the Hub credentials were checked")

    monkeypatch.setattr(training, "BatchSource", no_data)
    out = tmp_path / "run"
    rc = train_command.main(["--preset", "digits-cpu", "--output_dir", str(out), "--push_to_hub", "--hub_model_id", "x"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert re.search(r"needs a token with write access: pass --hub_token, set HF_TOKEN, or run `hf auth login`", err)
    assert not out.exists(), "nothing was written"


@pytest.mark.parametrize("token, message", [
    ("hf_notAKnownToken", r"rejected the token \(HTTP 401\).*/settings/tokens"),
    (READ_TOKEN, r"token of bob is read-only"),
])
def test_bad_tokens_fail_with_their_reason(at_hub, token, message):
    with pytest.raises(HubError, match=message):
        HubPusher("some-run", token=token)


def test_writing_to_someone_elses_namespace_fails(at_hub):
    with pytest.raises(HubError, match=r"Cannot create or write to the repo carol/run .*HTTP 403"):
        HubPusher("carol/run", token=WRITE_TOKEN)


def test_unreachable_hub_fails_fast_with_the_retry_command(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with hub_endpoint(monkeypatch, f"http://127.0.0.1:{port}", tmp_path):
        with pytest.raises(HubError, match=r"Cannot reach the Hub at http://127.0.0.1:\d+ .*ddpm-push runs/x --hub_model_id r"):
            HubPusher("r", token=WRITE_TOKEN, output_dir="runs/x")


def test_invalid_repo_id_is_refused(at_hub):
    with pytest.raises(HubError, match=r"--hub_model_id 'a/b/c' is not a valid repo id"):
        HubPusher("a/b/c", token=WRITE_TOKEN)


def test_hub_flags_need_push_to_hub():
    with pytest.raises(ValueError, match="need --push_to_hub"):
        resolve_config({**TINY, "hub_push_every": 10})
    with pytest.raises(ValueError, match="--hub_push_every=0 must be at least 1"):
        resolve_config({**TINY, "push_to_hub": True, "hub_push_every": 0})
    config = resolve_config({**TINY, "push_to_hub": True, "hub_model_id": "me/x", "hub_private_repo": True})
    assert "hub" not in reproduce_command(config)


# ---------------------------------------------------------------- pushing


def _pipeline_folder(path: Path) -> Path:
    from ddpm_hf import DDPMPipeline, DDPMScheduler
    from ddpm_hf.diffusion.unets import build_unet

    torch.manual_seed(0)
    DDPMPipeline(unet=build_unet("cpu-tiny", sample_size=8, in_channels=1), scheduler=DDPMScheduler()).save_pretrained(path)
    (path / "samples.png").write_bytes(b"first")
    return path


def test_background_push_uploads_a_snapshot_without_blocking(at_hub, tmp_path):
    folder = _pipeline_folder(tmp_path / "run")
    pusher = HubPusher("background", token=WRITE_TOKEN, private=True)
    at_hub.commit_gate.clear()  # the Hub holds the commit until released
    try:
        future = pusher.push_in_background(folder, "step 1")
        assert future is not None and not future.done(), "push_in_background returned before the upload finished"
        (folder / "samples.png.new").write_bytes(b"second")
        os.replace(folder / "samples.png.new", folder / "samples.png")  # training replaces a file meanwhile
        assert pusher.push_in_background(folder, "step 2") is None, "a push while one is in flight is skipped"
    finally:
        at_hub.commit_gate.set()
    future.result(timeout=60)
    repo = at_hub.repos["alice/background"]
    assert repo.private and [c.message for c in repo.commits] == ["initial commit", "step 1"]
    assert repo.head.files["samples.png"] == b"first", "the upload is the snapshot taken when push was called"
    pusher.push(folder, "final")
    assert at_hub.files("alice/background")["samples.png"] == b"second"
    assert not list(folder.glob(".hub-push*"))
    pusher.close()


@pytest.mark.slow
def test_ddpm_push_command_through_hf_endpoint(pushed_run, hub, tmp_path):
    out = shutil.copytree(pushed_run[0], tmp_path / "run")
    result = subprocess.run([sys.executable, "-m", "ddpm_hf.commands.push", str(out), "--hub_model_id", "cli-push", "--hub_token", WRITE_TOKEN],
                            env=subprocess_env(hub, tmp_path / "hf-home"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"to {hub.endpoint}/alice/cli-push" in result.stdout
    assert WRITE_TOKEN not in result.stdout + result.stderr
    files = hub.files("alice/cli-push")
    assert set(files) == PUSHED | {".gitattributes", animation(out)}
    assert 'from_pretrained("alice/cli-push")' in files["README.md"].decode()
    assert files["README.md"] == (out / "README.md").read_bytes(), "the local card names the repo too"


@pytest.mark.slow
def test_ddpm_push_uploads_the_post_hoc_ema_snapshots_only_when_asked(pushed_run, hub, tmp_path):
    out = shutil.copytree(pushed_run[0], tmp_path / "run")
    (out / "ema_snapshots").mkdir()
    (out / "ema_snapshots" / "snapshots.json").write_text('{"snapshots": []}')
    (out / "ema_snapshots" / "step-00000002-sigma_rel-0.05.safetensors").write_bytes(b"weights")
    for repo, flags in (("cli-plain", []), ("cli-snapshots", ["--push_snapshots"])):
        result = subprocess.run([sys.executable, "-m", "ddpm_hf.commands.push", str(out), "--hub_model_id", repo,
                                 "--hub_token", WRITE_TOKEN, *flags], env=subprocess_env(hub, tmp_path / "hf-home"),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    assert not any(name.startswith("ema_snapshots/") for name in hub.files("alice/cli-plain"))
    snapshots = {k: v for k, v in hub.files("alice/cli-snapshots").items() if k.startswith("ema_snapshots/")}
    assert snapshots == {"ema_snapshots/snapshots.json": b'{"snapshots": []}',
                         "ema_snapshots/step-00000002-sigma_rel-0.05.safetensors": b"weights"}


@pytest.mark.slow
def test_ddpm_distill_push_to_hub_publishes_the_last_student_with_its_card_and_no_round(hub, tmp_path):
    """`ddpm-distill --push_to_hub` checks the token first, then sends the top folder once the rounds end (as ddpm-push
    sends it): the student's pipeline, its card naming the repo, the card's grids and distill.json; no round, no
    checkpoint, no teacher sample. The pushed repo loads in plain diffusers and samples at its steps."""
    from ddpm_hf import DDPMPipeline, DDPMScheduler, build_unet

    torch.manual_seed(0)
    teacher = tmp_path / "teacher"
    DDPMPipeline(build_unet("cpu-tiny", sample_size=8, in_channels=1, out_channels=1), DDPMScheduler()).save_pretrained(teacher)
    out = tmp_path / "distilled"
    command = [sys.executable, "-m", "ddpm_hf.commands.distill", str(teacher), str(out), "--to_steps", "1", "--from_steps",
               "2", "--steps_per_round", "1", "--teacher_samples", "4", "--batch_size", "4", "--report_to", "none",
               "--no-card_figures", "--push_to_hub", "--hub_model_id", "distilled"]
    env = subprocess_env(hub, tmp_path / "hf-home")
    refused = subprocess.run(command + ["--hub_token", READ_TOKEN], env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and not out.exists(), refused.stderr[-2000:]
    result = subprocess.run(command + ["--hub_token", WRITE_TOKEN], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"to {hub.endpoint}/alice/distilled" in result.stdout and WRITE_TOKEN not in result.stdout + result.stderr
    files = hub.files("alice/distilled")
    assert set(files) == {".gitattributes", "README.md", "model_index.json", "unet/config.json",
                          "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                          "student_samples.png", "teacher_ddim_samples.png", "distill.json"}
    assert 'from_pretrained("alice/distilled")' in files["README.md"].decode()
    assert files["unet/diffusion_pytorch_model.safetensors"] == (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    load = ("import sys, diffusers; pipe = diffusers.DDPMPipeline.from_pretrained(sys.argv[1]); "
            "pipe.scheduler.set_timesteps(1); print(type(pipe.scheduler).__module__, pipe.scheduler.timesteps.tolist())")
    loaded = subprocess.run([sys.executable, "-c", load, "alice/distilled"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.split() == ["diffusers.schedulers.scheduling_ddim", "[999]"]


def test_ddpm_push_refuses_a_folder_without_a_pipeline(at_hub, tmp_path):
    (tmp_path / "training_config.json").write_text("{}")
    with pytest.raises(HubError, match=r"has no model_index.json: give the output folder of a finished training run"):
        push_output_folder(tmp_path, repo_id="x", token=WRITE_TOKEN)



@pytest.mark.parametrize("source", ["HF_TOKEN", "login"])
def test_token_from_the_environment_or_the_login(at_hub, tmp_path, monkeypatch, source):
    from huggingface_hub import constants

    if source == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    else:  # what `hf auth login` writes
        Path(constants.HF_TOKEN_PATH).write_text(WRITE_TOKEN)
    pusher = HubPusher(f"from-{source.lower()}")
    assert pusher.repo_id == f"alice/from-{source.lower()}" and pusher.repo_id in at_hub.repos
    pusher.close()


@pytest.mark.slow
def test_two_processes_push_once_per_push(hub, tmp_path):
    """accelerate launch with 2 CPU processes, HF_TOKEN from the environment: only the main process checks
    and pushes, and the other process neither waits for it nor deadlocks."""
    from common import REPO as CHECKOUT
    from common import cli_args

    overrides = dict(TINY, max_train_steps=4, checkpointing_steps=4, save_images_steps=2, output_dir=tmp_path / "run",
                     push_to_hub=True, hub_model_id="two-procs", hub_push_every=2)
    cmd = launch_two(CHECKOUT / "train_ddpm.py", *cli_args(overrides))
    whoami_before = sum(1 for _, path, _ in hub.requests if path.startswith("/api/whoami"))
    proc = subprocess.run(cmd, env=subprocess_env(hub, tmp_path / "hf-home", HF_TOKEN=WRITE_TOKEN),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stderr and WRITE_TOKEN not in proc.stdout + proc.stderr
    assert [c.message for c in hub.repos["alice/two-procs"].commits] == ["initial commit", "Training step 2 of 4", "End of training: step 4"]
    assert sum(1 for _, path, _ in hub.requests if path.startswith("/api/whoami")) == whoami_before + 1
    assert set(hub.files("alice/two-procs")) == (PUSHED - {"samples/step-0000001.png"}) | {
        ".gitattributes", "samples/step-0000004.png", animation(tmp_path / "run")}
