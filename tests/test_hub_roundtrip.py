"""Hugging Face Hub round trip over real HTTP, offline.

A fine-tuned model is pushed with ``transformers.Trainer.push_to_hub()`` (create_repo + upload_folder + model card,
through the real ``huggingface_hub`` client) to the local Hub-API server of ``hub_server.py``, then loaded back with
``AutoModelForImageClassification.from_pretrained(repo)``, ``pipeline("image-classification", model=repo)`` and, for
timm models, ``timm.create_model("hf-hub:" + repo)``, from an empty download cache; predictions must not change.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import hub_server
import numpy as np
import pytest
import torch
from hub_server import TEST_TOKEN, HubServer, fresh_hf_cache, no_retry_sleep
from PIL import Image

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

hub = hub_server.hub  # the pytest fixture: a running local hub that huggingface_hub/transformers/timm talk to

LABELS = ["cat", "dog", "bird"]
ID2LABEL = dict(enumerate(LABELS))
LABEL2ID = {name: i for i, name in ID2LABEL.items()}


# ---------------------------------------------------------------------- helpers


def _tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
        num_labels=3,
        id2label=ID2LABEL,
        label2id=LABEL2ID,
    )
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return ViTForImageClassification(config), processor


def _random_dataset(n: int = 8, size: int = 32, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(3, size, size, generator=gen), "labels": i % 3} for i in range(n)]


def _trainer(model, output_dir: Path, repo_id: str, *, processing_class=None, size: int = 32, **overrides):
    from transformers import Trainer, TrainingArguments

    kwargs = {
        "output_dir": str(output_dir),
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-2,
        "report_to": [],
        "push_to_hub": True,
        "hub_model_id": repo_id,
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "logging_strategy": "no",
        "dataloader_num_workers": 0,
        **overrides,
    }
    return Trainer(
        model=model,
        args=TrainingArguments(**kwargs),
        train_dataset=_random_dataset(size=size),
        processing_class=processing_class,
    )


def _test_image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (40, 48, 3), dtype=np.uint8))


def _local_files(folder: Path) -> dict[str, bytes]:
    """Files of ``folder`` as ``upload_folder`` sees them with the Trainer's ignore patterns (``_*``, checkpoints)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not rel.startswith(("_", "checkpoint-")) and "/_" not in rel:
            out[rel] = path.read_bytes()
    return out


def _files_containing(folder: Path, needle: str) -> list[Path]:
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and needle.encode() in p.read_bytes()]


def _digests(files: dict[str, bytes]) -> dict[str, str]:
    return {path: hashlib.sha256(data).hexdigest() for path, data in files.items()}


@torch.no_grad()
def _logits(model, pixel_values: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(pixel_values=pixel_values).logits


def _downloads(server: HubServer) -> list[str]:
    return [r.path for r in server.requests if r.route in ("resolve", "cdn") and r.method == "GET"]


# ---------------------------------------------------------------------- transformers ViT


@pytest.mark.parametrize(
    "hub",
    [pytest.param({}, id="regular-files"), pytest.param({"lfs_threshold": 4096}, id="git-lfs")],
    indirect=True,
)
def test_trainer_push_to_hub_roundtrip_vit(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """regular-files: every file goes base64 in the commit (with hf_xet installed, through the pipelined upload).
    git-lfs: big files go through the LFS batch API + PUT (hf_xet disabled) and come back through a 302 to a
    "CDN" host, as on the Hub."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

    repo_id = "tester/tiny-vit"
    output_dir = tmp_path / "out"
    model, processor = _tiny_vit()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer(model, output_dir, repo_id, processing_class=processor)
    assert hub.repo_exists(repo_id)  # Trainer(push_to_hub=True) creates the repo up front

    trainer.train()
    assert any(not torch.equal(initial[k], v) for k, v in model.state_dict().items()), "training changed nothing"
    commit = trainer.push_to_hub()

    # The server holds exactly what the Trainer wrote in output_dir (minus "_*" and checkpoint-* folders).
    assert commit.oid == hub.head(repo_id)
    assert hub.commits(repo_id)[0]["title"] == "End of training"
    pushed = hub.files(repo_id)
    local = _local_files(output_dir)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(pushed)
    assert {path: data for path, data in pushed.items() if path != ".gitattributes"} == local
    card = pushed["README.md"].decode()
    assert card.startswith("---\n") and "generated_from_trainer" in card
    assert hub.requests_for("validate_yaml"), "the model card metadata is validated before the upload"

    # The token went over the wire (HF_TOKEN), and nowhere else: not on the server, not in output_dir.
    writes = [r for r in hub.requests if r.route in ("create_repo", "preupload", "commit")]
    assert writes and all(r.authorization == f"Bearer {TEST_TOKEN}" for r in writes)
    assert hub.tokens_seen == {TEST_TOKEN}
    assert hub.find_bytes(TEST_TOKEN) == []
    assert _files_containing(output_dir, TEST_TOKEN) == []
    lfs_files = {path for path, e in hub.file_entries(repo_id).items() if e.get("lfs")}
    if hub.lfs_threshold is None:
        assert not lfs_files and not hub.requests_for("lfs_batch")
    else:
        assert "model.safetensors" in lfs_files and hub.requests_for("lfs_upload")

    # Reference predictions of the in-memory fine-tuned model.
    image = _test_image()
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    expected = _logits(model, pixel_values)

    # Load back from an empty cache: every file must come over HTTP from the server.
    fresh_hf_cache(monkeypatch, tmp_path / "cache-after-push")
    n_downloads = len(_downloads(hub))
    reloaded = AutoModelForImageClassification.from_pretrained(repo_id)
    reloaded_processor = AutoImageProcessor.from_pretrained(repo_id)
    assert len(_downloads(hub)) > n_downloads
    if hub.lfs_threshold is not None:  # LFS files are fetched from the "CDN", without the Hub token
        cdn = hub.requests_for("cdn")
        assert cdn and all(r.authorization is None for r in cdn)
    assert type(reloaded).__name__ == "ViTForImageClassification"
    assert reloaded.config.id2label == ID2LABEL
    reloaded_pixels = reloaded_processor(images=image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(reloaded_pixels, pixel_values)
    torch.testing.assert_close(_logits(reloaded, pixel_values), expected, rtol=0, atol=1e-6)

    classifier = pipeline("image-classification", model=repo_id, device="cpu")
    predictions = classifier(image)
    probs = expected.softmax(-1)[0]
    assert predictions[0]["label"] == ID2LABEL[int(probs.argmax())]
    assert {p["label"]: p["score"] for p in predictions} == pytest.approx(
        {ID2LABEL[i]: float(probs[i]) for i in range(len(LABELS))}, abs=1e-5
    )


def test_hub_token_in_training_arguments_is_pickled_into_training_args_bin(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Why the round trip above authenticates through HF_TOKEN, not ``TrainingArguments(hub_token=...)``.

    transformers 5.x ``torch.save``s the whole TrainingArguments (token included) as ``training_args.bin`` and
    ``push_to_hub`` uploads it. This pins that behaviour and doubles as a positive control for the leak scan.
    """
    monkeypatch.delenv("HF_TOKEN")
    model, processor = _tiny_vit()
    output_dir = tmp_path / "out"
    trainer = _trainer(
        model, output_dir, "tester/tiny-vit-hub-token", processing_class=processor, hub_token=TEST_TOKEN
    )
    trainer.push_to_hub()

    assert hub.tokens_seen == {TEST_TOKEN}  # hub_token was used for the requests...
    entries = hub.file_entries("tester/tiny-vit-hub-token")
    leaked_blobs = {p.name for p in hub.find_bytes(TEST_TOKEN)}
    assert {path for path, e in entries.items() if e["sha256"] in leaked_blobs} == {"training_args.bin"}  # ...and kept
    assert [p.name for p in _files_containing(output_dir, TEST_TOKEN)] == ["training_args.bin"]


# ---------------------------------------------------------------------- timm through TimmWrapper


def _seed_timm_base(server: HubServer, tmp_path: Path, repo_id: str) -> None:
    """Publish a randomly initialised timm checkpoint on the local hub, laid out like the ``timm/*`` Hub repos."""
    torch.manual_seed(1)
    base = timm.create_model("test_resnet", pretrained=False)
    folder = tmp_path / "timm-base"
    timm.models.save_for_hf(base, folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    # timm 1.0.31 also records "model_args" (with num_classes), which transformers 5.24's TimmWrapper passes along
    # with num_classes=num_labels -> TypeError. The timm/* repos on the Hub have no model_args: mimic them.
    config.pop("model_args", None)
    server.seed_repo(
        repo_id,
        {"config.json": json.dumps(config, indent=2), "model.safetensors": folder / "model.safetensors"},
    )


def test_trainer_push_to_hub_roundtrip_timm(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load as load_safetensors
    from transformers import AutoModelForImageClassification

    base_repo, repo_id = "timm/test_resnet.r160_in1k", "tester/tiny-timm"
    _seed_timm_base(hub, tmp_path, base_repo)
    model = AutoModelForImageClassification.from_pretrained(
        base_repo, num_labels=3, id2label=ID2LABEL, label2id=LABEL2ID, ignore_mismatched_sizes=True
    )
    assert type(model).__name__ == "TimmWrapperForImageClassification"
    # transformers 5.24 writes "model_args": null for checkpoints that had none; timm 1.0.31 then fails in
    # load_model_config_from_hf (None.get). A dict keeps the pushed repo loadable by timm (asserted below).
    model.config.model_args = {}

    trainer = _trainer(model, tmp_path / "out", repo_id, size=64)
    trainer.train()
    trainer.push_to_hub()

    pushed = hub.files(repo_id)
    config = json.loads(pushed["config.json"])
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 3
    assert config["label_names"] == LABELS
    weights = load_safetensors(pushed["model.safetensors"])
    assert weights and not any(k.startswith("timm_model.") for k in weights), "weights must be in timm's layout"
    assert hub.find_bytes(TEST_TOKEN) == []

    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    expected = _logits(model, pixel_values)  # eval mode: BatchNorm running stats

    fresh_hf_cache(monkeypatch, tmp_path / "cache-after-push")
    timm_model = timm.create_model("hf-hub:" + repo_id, pretrained=True).eval()
    assert timm_model.pretrained_cfg["hf_hub_id"] == repo_id
    assert timm_model.pretrained_cfg["label_names"] == LABELS
    with torch.no_grad():
        torch.testing.assert_close(timm_model(pixel_values), expected, rtol=0, atol=1e-6)

    reloaded = AutoModelForImageClassification.from_pretrained(repo_id)
    assert type(reloaded).__name__ == "TimmWrapperForImageClassification"
    assert reloaded.config.id2label == ID2LABEL
    torch.testing.assert_close(_logits(reloaded, pixel_values), expected, rtol=0, atol=1e-6)

    # The workaround above is needed: the same repo with "model_args": null is not loadable by timm.
    hub.seed_repo(
        "tester/tiny-timm-null-args",
        {"config.json": json.dumps({**config, "model_args": None}), "model.safetensors": pushed["model.safetensors"]},
    )
    with pytest.raises(AttributeError):
        timm.create_model("hf-hub:tester/tiny-timm-null-args", pretrained=True)


# ---------------------------------------------------------------------- error path


def test_push_fails_on_server_error_and_keeps_local_files(
    hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub.errors import HfHubHTTPError
    from transformers import ViTForImageClassification

    sleeps = no_retry_sleep(monkeypatch)  # huggingface_hub retries 5xx with back-off: skip the waiting
    repo_id = "tester/tiny-vit-broken"
    output_dir = tmp_path / "out"
    model, processor = _tiny_vit()
    trainer = _trainer(model, output_dir, repo_id, processing_class=processor, save_strategy="no")
    trainer.train()
    initial_head = hub.head(repo_id)

    hub.fail("commit", 500, message="Internal Error - We're working hard to fix this as soon as possible!")
    with pytest.raises(HfHubHTTPError) as excinfo:
        trainer.push_to_hub()
    assert excinfo.value.response.status_code == 500
    attempts = len(hub.requests_for("commit"))
    assert attempts >= 1 and len(sleeps) >= attempts - 1

    # Nothing was committed on the server...
    assert hub.head(repo_id) == initial_head
    assert set(hub.files(repo_id)) == {".gitattributes"}
    # ...and the local output is complete and loadable.
    local = _local_files(output_dir)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "training_args.bin"} <= set(
        local
    )
    assert not [p for p in output_dir.rglob("*") if p.suffix in (".tmp", ".incomplete", ".lock")]
    pixel_values = processor(images=_test_image(), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(
        _logits(ViTForImageClassification.from_pretrained(output_dir), pixel_values),
        _logits(model, pixel_values),
        rtol=0,
        atol=1e-6,
    )

    # Once the server recovers, the same files go up unchanged.
    hub.clear_failures()
    trainer.push_to_hub()
    assert _digests(_local_files(output_dir)) == _digests(local)
    pushed = hub.files(repo_id)
    assert {path: data for path, data in pushed.items() if path != ".gitattributes"} == local


# ---------------------------------------------------------------------- olah (real read-only mirror)


def test_olah_mirror_serves_pushed_models(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What was pushed loads back identically through olah, offline, from a git mirror of the pushed repos."""
    pytest.importorskip("olah.server")
    if shutil.which("git") is None:
        pytest.skip("git is needed to build olah's mirror repos")
    from transformers import AutoModelForImageClassification

    vit, _ = _tiny_vit()
    vit.push_to_hub("tester/tiny-vit")
    timm_base = "timm/test_resnet.r160_in1k"
    _seed_timm_base(hub, tmp_path, timm_base)
    wrapped = AutoModelForImageClassification.from_pretrained(
        timm_base, num_labels=3, id2label=ID2LABEL, label2id=LABEL2ID, ignore_mismatched_sizes=True
    )
    wrapped.config.model_args = {}  # see test_trainer_push_to_hub_roundtrip_timm
    wrapped.push_to_hub("tester/tiny-timm")

    mirrors = tmp_path / "mirrors"
    for repo_id in ("tester/tiny-vit", "tester/tiny-timm"):
        hub_server.export_git_mirror(hub, repo_id, mirrors)
    gen = torch.Generator().manual_seed(3)
    vit_pixels, timm_pixels = torch.randn(2, 3, 32, 32, generator=gen), torch.randn(2, 3, 64, 64, generator=gen)
    expected_vit, expected_timm = _logits(vit, vit_pixels), _logits(wrapped, timm_pixels)

    with hub_server.olah_mirror(mirrors, tmp_path / "olah") as endpoint:
        hub_server.point_hf_at(monkeypatch, endpoint, hf_home=tmp_path / "hf_home_olah", token=None)
        n_requests = len(hub.requests)
        reloaded_vit = AutoModelForImageClassification.from_pretrained("tester/tiny-vit")
        reloaded_wrapped = AutoModelForImageClassification.from_pretrained("tester/tiny-timm")
        timm_model = timm.create_model("hf-hub:tester/tiny-timm", pretrained=True).eval()
        assert len(hub.requests) == n_requests, "everything must come from olah, not from the local hub"

    torch.testing.assert_close(_logits(reloaded_vit, vit_pixels), expected_vit, rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(reloaded_wrapped, timm_pixels), expected_timm, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(timm_model(timm_pixels), expected_timm, rtol=0, atol=1e-6)
