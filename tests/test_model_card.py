"""The model card every run writes: metadata, images that resolve, metrics with protocol, reproduce command."""

import json
import re
import shlex
import sys
from pathlib import Path

import markdown
import pytest
from huggingface_hub import ModelCard

from ddpm_hf.publishing.model_card import TAGS, write_model_card
from ddpm_hf.commands.train_flags import parse_args
from ddpm_hf.recipes.resolve import resolve_config
from ddpm_hf.training.loop import train

sys.path.insert(0, str(Path(__file__).parent))
from common import TINY


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path_factory.mktemp("run")
    train(resolve_config({**TINY, "preset": "digits-cpu", "max_train_steps": 2, "checkpointing_steps": 2,
                          "save_images_steps": 2, "output_dir": str(out)}))
    AcceleratorState._reset_state(reset_partial_state=True)
    return out


@pytest.mark.slow
def test_card_metadata(run_dir):
    card = ModelCard.load(run_dir / "README.md")
    assert card.data.library_name == "diffusers" and card.data.license == "apache-2.0"
    assert set(TAGS) <= set(card.data.tags)
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert "model-index" not in card.data.to_dict()  # no metrics yet, no results claimed


def test_card_renders_and_its_images_resolve_to_files(run_dir):
    html = markdown.markdown(ModelCard.load(run_dir / "README.md").text, extensions=["fenced_code"])
    sources = re.findall(r'<img[^>]*src="([^"]+)"', html)
    (animation,) = [p.name for p in run_dir.glob("denoising.*")]  # GIF or WebP, whichever is smaller
    assert sorted(sources) == sorted([animation, "loss_curve.png", "progressive.png", "samples.png"])
    assert all((run_dir / s).is_file() for s in sources)
    recorded = json.loads((run_dir / "figures.json").read_text())
    assert set(recorded) == {animation, "progressive.png"}
    assert recorded[animation]["num_inference_steps"] == json.loads((run_dir / "training_config.json").read_text())[
        "sample_inference_steps"]
    # the usage snippet loads the run's own folder (it said "path/to/this/folder" before), and no link leads nowhere
    assert f'DDPMPipeline.from_pretrained("{run_dir}")' in html.replace("&quot;", '"')
    assert "pypi.org" not in html


def test_reproduce_command_gives_back_the_config(run_dir):
    text = (run_dir / "README.md").read_text()
    command = re.search(r"```bash\n(python train_ddpm.py[^\n]*)\n```", text).group(1)
    config, _ = parse_args(shlex.split(command)[2:])
    saved = json.loads((run_dir / "training_config.json").read_text())
    assert {k: v for k, v in vars(config).items()} == saved


def test_card_with_metrics_has_model_index_and_protocol(run_dir, tmp_path):
    metrics = {"fid": 12.5, "kid": 0.01, "inception_score": {"mean": 3.2, "std": 0.1, "splits": 10},
               "protocol": {"num_samples": 1000, "sampling": {"scheduler": "ddim", "num_inference_steps": 50, "weights": "EMA"},
                            "reference": {"kind": "dataset", "dataset": "digits", "split": "train"}, "mode": "clean",
                            "feature_network": {"name": "inception-v3", "weights_sha256": "ab" * 32}}}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    try:
        card = ModelCard.load(write_model_card(run_dir, repo_id="someone/ddpm-digits"))
    finally:
        (run_dir / "metrics.json").unlink()
        write_model_card(run_dir)
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results == {"FID": 12.5, "KID": 0.01, "Inception Score": 3.2}
    assert card.data.to_dict()["model-index"][0]["name"] == "someone/ddpm-digits"
    assert "| FID | 12.5000 |" in card.text and "1000 samples (ddim sampler, 50 steps, EMA weights)" in card.text
    assert 'from_pretrained("someone/ddpm-digits")' in card.text


def test_card_shows_fd_dinov2_with_precision_and_recall(run_dir):
    metrics = {"fd_dinov2": 321.5, "precision": 0.75, "recall": 0.5, "precision_recall": {"k": 3},
               "protocol": {"num_samples": 500, "reference": {"kind": "dataset", "dataset": "digits", "split": "train"},
                            "feature_network": {"name": "dinov2 facebook/dinov2-large", "kind": "dinov2"}}}
    (run_dir / "metrics-dinov2.json").write_text(json.dumps(metrics))
    try:
        card = ModelCard.load(write_model_card(run_dir))
    finally:
        (run_dir / "metrics-dinov2.json").unlink()
        write_model_card(run_dir)
    assert {r.metric_name: r.metric_value for r in card.data.eval_results} == {"FD_DINOv2": 321.5}
    assert "| FD_DINOv2 | 321.5000 |" in card.text
    assert "| Precision (k = 3) | 0.7500 |" in card.text and "| Recall (k = 3) | 0.5000 |" in card.text
    assert "500 samples, features dinov2 facebook/dinov2-large" in card.text and "No metrics yet" not in card.text
