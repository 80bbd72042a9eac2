"""The fine-tuning CLI with ``--push_to_hub``, against the local Hub-API server of ``hub_server.py``, offline.

``hf_sp.finetune.main`` fine-tunes, writes the hf_sp model card and pushes through ``SPTrainer.push_to_hub`` (the real
``huggingface_hub`` client over HTTP to 127.0.0.1); the pushed repo is then loaded back from an empty download cache
with ``timm.create_model("hf-hub:...")``, ``AutoModelForImageClassification.from_pretrained`` and
``pipeline("image-classification")``, which must predict what the local ``output_dir`` predicts. A failed push must
keep everything local and say how to upload it again; a token given on the command line must not end up in any file.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import hub_server
import pytest
import timm
import torch
import transformers
from hub_server import TEST_TOKEN, HubServer, fresh_hf_cache, no_retry_sleep
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image
from test_finetune import QUICK

from hf_sp.data import DIGITS, load_image_dataset
from hf_sp.finetune import main
from hf_sp.hub import PushError

hub = hub_server.hub  # the pytest fixture: HF_ENDPOINT / HF_TOKEN / HF_HOME point at a running local hub

DIGIT_LABELS = [str(i) for i in range(10)]
FORMULA = "alpha/2 * ||w_S - w0_S||^2"
COMMIT_MESSAGE = "hf_sp: fine-tuned model, card and results"
#: What every CLI run leaves in output_dir (and, but for checkpoints, pushes).
RUN_FILES = {
    "README.md",
    "all_results.json",
    "config.json",
    "eval_results.json",
    "model.safetensors",
    "test_results.json",
    "train_results.json",
    "trainer_state.json",
    "training_args.bin",
}


# ---------------------------------------------------------------------- helpers


def _cli(output_dir: Path, repo_id: str, *extra: str) -> None:
    main([*QUICK, "--output_dir", str(output_dir), "--push_to_hub", "--hub_model_id", repo_id, *extra])


def _digit_image(index: int = 0) -> Image.Image:
    """A test-split digit as the CLI sees it (8x8 grey, upscaled by the transforms); RGB for the pipelines."""
    return load_image_dataset(DIGITS)["test"][index]["image"].convert("RGB")


def _tiny_vit_folder(folder: Path) -> Path:
    """A tiny transformers ViT (5 labels: the CLI gives it a new 10-way head) and its image processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
        num_labels=5,
    )
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _local_timm_lite0(output_dir: Path) -> torch.nn.Module:
    """The fine-tuned model of ``output_dir`` read by timm alone, from the safetensors file."""
    model = timm.create_model(
        "tf_efficientnet_lite0",
        pretrained=True,
        num_classes=10,
        pretrained_cfg_overlay={"file": str(output_dir / "model.safetensors"), "num_classes": 10},
    )
    return model.eval()


@torch.no_grad()
def _logits(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    model.eval()
    if isinstance(model, transformers.PreTrainedModel):
        return model(pixel_values=pixel_values).logits
    return model(pixel_values)


def _scores(predictions: list[dict]) -> dict[str, float]:
    return {p["label"]: p["score"] for p in predictions}


def _files_containing(folder: Path, needle: str) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and needle.encode() in p.read_bytes()
    )


def _checkpoints(output_dir: Path) -> list[Path]:
    return sorted(p for p in output_dir.glob("checkpoint-*") if p.is_dir())


# ---------------------------------------------------------------------- the packaged timm model


@pytest.mark.slow
def test_cli_push_of_the_packaged_timm_model_loads_back_everywhere(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import ModelCard
    from safetensors.torch import load as load_safetensors
    from transformers import AutoModelForImageClassification, pipeline

    repo_id, out = "tester/lite0-digits", tmp_path / "out"
    _cli(out, repo_id)

    # What was pushed: the run's files, byte for byte, without the checkpoint folders.
    assert _checkpoints(out), "the run saves a checkpoint every epoch (CLI default)"
    pushed = hub.files(repo_id)
    assert set(pushed) == RUN_FILES | {".gitattributes"}
    assert not [path for path in pushed if path.startswith("checkpoint-") or "/checkpoint-" in path]
    for name in RUN_FILES:
        assert pushed[name] == (out / name).read_bytes(), name
    assert hub.commits(repo_id)[0]["title"] == COMMIT_MESSAGE
    assert hub.find_bytes(TEST_TOKEN) == []
    weights = load_safetensors(pushed["model.safetensors"])
    assert weights and not any(k.startswith("timm_model.") for k in weights), "weights must be in timm's layout"

    # The pushed README.md is the hf_sp card, with the eval results in the YAML front matter (model-index).
    text = pushed["README.md"].decode()
    assert "l2_sp" in text and FORMULA in text and "li2018explicit" in text
    card = ModelCard(text)
    assert card.data.library_name == "timm" and card.data.base_model == "timm/tf_efficientnet_lite0.in1k"
    assert "hf_sp" in card.data.tags
    results = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert {("validation", "accuracy"), ("test", "accuracy"), ("validation", "top5_accuracy")} <= set(results)
    local_results = json.loads((out / "all_results.json").read_text())
    assert results["validation", "accuracy"] == pytest.approx(local_results["eval_accuracy"])
    assert results["test", "accuracy"] == pytest.approx(local_results["test_accuracy"])

    local = _local_timm_lite0(out)
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = _logits(local, pixel_values)

    fresh_hf_cache(monkeypatch, tmp_path / "cache-after-push")
    n_requests = len(hub.requests)
    timm_model = timm.create_model("hf-hub:" + repo_id, pretrained=True).eval()
    assert len(hub.requests) > n_requests, "the model must come from the hub, not from a cache"
    assert timm_model.pretrained_cfg["hf_hub_id"] == repo_id
    assert timm_model.pretrained_cfg["label_names"] == DIGIT_LABELS
    torch.testing.assert_close(_logits(timm_model, pixel_values), expected, rtol=0, atol=1e-5)

    reloaded = AutoModelForImageClassification.from_pretrained(repo_id)
    assert type(reloaded).__name__ == "TimmWrapperForImageClassification"
    assert reloaded.config.id2label == dict(enumerate(DIGIT_LABELS))
    torch.testing.assert_close(_logits(reloaded, pixel_values), expected, rtol=0, atol=1e-5)

    # The pipeline builds a TimmWrapperImageProcessor from the pretrained_cfg in config.json (there is no
    # preprocessor_config.json): compare with the local model on the pipeline's own preprocessing. (That
    # pretrained_cfg is still the ImageNet model's, 224 px, although the run trained and evaluated at 32 px.)
    classifier = pipeline("image-classification", model=repo_id, device="cpu")
    assert type(classifier.image_processor).__name__ == "TimmWrapperImageProcessor"
    image = _digit_image()
    processed = classifier.image_processor(image, return_tensors="pt")["pixel_values"]
    probs = _logits(local, processed).softmax(-1)[0]
    predictions = classifier(image, top_k=10)
    assert predictions[0]["label"] == DIGIT_LABELS[int(probs.argmax())]
    assert _scores(predictions) == pytest.approx({DIGIT_LABELS[i]: float(p) for i, p in enumerate(probs)}, abs=1e-5)


# ---------------------------------------------------------------------- a transformers model


@pytest.mark.slow
def test_cli_push_of_a_transformers_vit_gives_the_same_pipeline(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import pipeline

    repo_id, out = "tester/tiny-vit-digits", tmp_path / "out"
    source = _tiny_vit_folder(tmp_path / "vit-source")
    _cli(out, repo_id, "--model_name_or_path", str(source), "--image_size", "32")

    pushed = hub.files(repo_id)
    assert set(pushed) == RUN_FILES | {"preprocessor_config.json", ".gitattributes"}
    assert pushed["preprocessor_config.json"] == (out / "preprocessor_config.json").read_bytes()
    text = pushed["README.md"].decode()
    assert "l2_sp" in text and FORMULA in text and "library_name: transformers" in text
    assert hub.find_bytes(TEST_TOKEN) == []

    image = _digit_image(3)
    expected = pipeline("image-classification", model=str(out), device="cpu")(image, top_k=10)
    fresh_hf_cache(monkeypatch, tmp_path / "cache-after-push")
    classifier = pipeline("image-classification", model=repo_id, device="cpu")
    assert type(classifier.model).__name__ == "ViTForImageClassification"
    assert classifier.model.config.id2label == dict(enumerate(DIGIT_LABELS))
    predictions = classifier(image, top_k=10)
    assert predictions[0]["label"] == expected[0]["label"]
    assert _scores(predictions) == pytest.approx(_scores(expected), abs=1e-5)


# ---------------------------------------------------------------------- a failed push


def _check_push_exit(exit_: SystemExit, output_dir: Path, repo_id: str) -> str:
    """main() ends a failed push with SystemExit("error: ...") carrying the PushError's message, which names the
    output folder and the command that uploads it again; returns that command."""
    message = exit_.code
    assert isinstance(message, str) and message.startswith(f"error: Pushing {output_dir} to {repo_id} failed: ")
    push_error = exit_.__context__  # raised ... from None: no chained traceback, but the error is kept
    assert isinstance(push_error, PushError) and message == f"error: {push_error}"
    assert isinstance(push_error.__cause__, HfHubHTTPError) and push_error.__cause__.response.status_code == 500
    assert "HfHubHTTPError" in message and "500" in message
    assert f"the model, card and checkpoints are in {output_dir}" in message
    command = f"hf upload {repo_id} {output_dir} --exclude 'checkpoint-*'"
    assert f"Upload them again with `{command}`" in message
    return command


def _check_everything_is_local(output_dir: Path) -> None:
    assert RUN_FILES | {"preprocessor_config.json"} <= {p.name for p in output_dir.iterdir() if p.is_file()}
    checkpoints = _checkpoints(output_dir)
    assert checkpoints and (checkpoints[-1] / "model.safetensors").is_file()
    card = (output_dir / "README.md").read_text()
    assert "l2_sp" in card and "model-index:" in card


@pytest.mark.slow
def test_push_failing_at_the_end_keeps_everything_local_and_says_how_to_upload_again(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The final push (model, card and results) fails for good: the CLI exits with the PushError's message, and the
    `hf upload` command it suggests works once the Hub is back."""
    import hf_sp.hub

    sleeps = no_retry_sleep(monkeypatch)  # huggingface_hub retries 5xx with back-off: skip the waiting
    repo_id, out = "tester/tiny-vit-broken", tmp_path / "out"
    source = _tiny_vit_folder(tmp_path / "vit-source")
    finish_and_push = hf_sp.hub.finish_and_push

    def hub_down_at_the_end(trainer, metrics):  # finetune.run imports it from hf_sp.hub when it gets there
        hub.fail("commit", 500, message="Internal Error - We're working hard to fix this as soon as possible!")
        finish_and_push(trainer, metrics)

    monkeypatch.setattr(hf_sp.hub, "finish_and_push", hub_down_at_the_end)
    with pytest.raises(SystemExit) as excinfo:
        _cli(out, repo_id, "--model_name_or_path", str(source), "--image_size", "32")
    command = _check_push_exit(excinfo.value, out, repo_id)
    assert len(hub.requests_for("commit")) >= 2 and sleeps, "the commit was retried"
    assert COMMIT_MESSAGE not in [c["title"] for c in hub.commits(repo_id)]
    _check_everything_is_local(out)

    # Once the server is back, the command of the message uploads the run as the CLI would have pushed it.
    hub.clear_failures()
    hf = shutil.which("hf", path=str(Path(sys.executable).parent)) or shutil.which("hf")
    if hf is None:
        pytest.skip("the `hf` command line is not installed")
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # HF_ENDPOINT, HF_TOKEN, ... point at the local hub
    done = subprocess.run([hf, *shlex.split(command)[1:]], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    pushed = hub.files(repo_id)
    assert set(pushed) == RUN_FILES | {"preprocessor_config.json", ".gitattributes"}
    for name in set(pushed) - {".gitattributes"}:
        assert pushed[name] == (out / name).read_bytes(), name
    assert hub.find_bytes(TEST_TOKEN) == []


@pytest.mark.slow
def test_hub_down_for_the_whole_run_raises_push_error_after_saving_everything(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_retry_sleep(monkeypatch)
    repo_id, out = "tester/tiny-vit-down", tmp_path / "out"
    source = _tiny_vit_folder(tmp_path / "vit-source")
    hub.fail("commit", 500)  # every commit, from the first epoch's checkpoint push on

    with pytest.raises(SystemExit) as excinfo:
        _cli(out, repo_id, "--model_name_or_path", str(source), "--image_size", "32")
    _check_push_exit(excinfo.value, out, repo_id)
    assert set(hub.files(repo_id)) == {".gitattributes"}  # nothing but the repo's creation reached the server
    _check_everything_is_local(out)


# ---------------------------------------------------------------------- a token on the command line


@pytest.mark.slow
@pytest.mark.parametrize(
    "hub_strategy",
    [
        pytest.param("end", id="hub_strategy-end"),
        pytest.param("every_save", id="hub_strategy-every_save"),
    ],
)
def test_hub_token_on_the_command_line_is_used_but_written_nowhere(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub_strategy: str
) -> None:
    """every_save is the CLI default (a push at each epoch's checkpoint); end pushes only when the run is done."""
    monkeypatch.delenv("HF_TOKEN")  # the only token is the one on the command line
    repo_id, out = "tester/tiny-vit-token", tmp_path / "out"
    source = _tiny_vit_folder(tmp_path / "vit-source")
    _cli(
        out,
        repo_id,
        *("--model_name_or_path", str(source), "--image_size", "32"),
        *("--hub_strategy", hub_strategy, "--hub_token", TEST_TOKEN),
    )

    assert hub.tokens_seen == {TEST_TOKEN}, "the pushes authenticate with --hub_token"
    assert set(hub.files(repo_id)) >= RUN_FILES
    assert hub.commits(repo_id)[0]["title"] == COMMIT_MESSAGE
    card = hub.files(repo_id)["README.md"].decode()
    assert "l2_sp" in card and TEST_TOKEN not in card
    assert _files_containing(out, TEST_TOKEN) == []  # training_args.bin of output_dir and checkpoints included
    leaked = {p.name for p in hub.find_bytes(TEST_TOKEN)}  # every blob and commit of the repo's history
    where = sorted(
        f"{commit['title']!r}: {path}"
        for commit in hub.commits(repo_id)
        for path, entry in hub.file_entries(repo_id, commit["id"]).items()
        if entry["sha256"] in leaked
    )
    assert not leaked, f"the token was pushed, in {where}"


def test_push_to_an_unreachable_hub_says_so_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hub_server.point_hf_at(monkeypatch, f"http://127.0.0.1:{port}", hf_home=tmp_path / "hf")
    out = tmp_path / "run"
    argv = [*QUICK, "--output_dir", str(out), "--push_to_hub", "--hub_model_id", "tester/nowhere"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = str(exit_info.value)
    assert message.count("\n") == 0 and f"127.0.0.1:{port}" in message and "Nothing was trained" in message
    assert "without --push_to_hub" in message and "hf upload tester/nowhere" in message
    assert not (out / "model.safetensors").exists()
