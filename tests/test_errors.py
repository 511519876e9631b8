"""Every bad input to load() gets a message that names the problem and the fix."""

import json

import pytest

import qwenkit
from qwenkit.config import ModelConfig
from qwenkit.errors import CheckpointError, ConfigError, DownloadError, UnsupportedModelError

from .conftest import hf_config, hf_qwen2, hf_state, write_checkpoint


@pytest.fixture
def good(tmp_path):
    ref = hf_qwen2(tie=True)
    return write_checkpoint(tmp_path / "ckpt", hf_config(ref), hf_state(ref))


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist: pass a checkpoint directory, a .gguf file"):
        qwenkit.load(str(tmp_path / "nope"))


def test_directory_without_weights(good):
    (good / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights in .*ckpt: expected one of model.safetensors"):
        qwenkit.load(good)


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json: pass a Hugging Face checkpoint directory"):
        qwenkit.load(tmp_path / "empty")


def test_truncated_safetensors(good):
    path = good / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a readable safetensors file .*re-download"):
        qwenkit.load(good, dtype="float32")


def test_corrupt_bin(good):
    (good / "model.safetensors").unlink()
    (good / "pytorch_model.bin").write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="pytorch_model.bin is not a readable PyTorch checkpoint"):
        qwenkit.load(good, dtype="float32")


def test_missing_shard(good):
    (good / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="lists shards that are not on disk: .*model-00002.safetensors"):
        qwenkit.load(good)


def test_config_missing_key(good):
    config = json.loads((good / "config.json").read_text())
    del config["num_hidden_layers"]
    (good / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"missing required key 'num_hidden_layers' in .*config.json"):
        qwenkit.load(good)


def test_config_v1_missing_key_names_alternatives():
    with pytest.raises(ConfigError, match=r"missing required key 'hidden_size' in x.json \(also looked for 'n_embd'\)"):
        ModelConfig.from_dict({"model_type": "qwen"}, source="x.json")


def test_config_not_json(good):
    (good / "config.json").write_text("{oops")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        qwenkit.load(good)


def test_unsupported_architecture(good):
    config = json.loads((good / "config.json").read_text())
    config["model_type"] = "llama"
    (good / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"model_type 'llama' .* not supported; qwenkit runs qwen \(Qwen-7B v1\), "
                                                     r"qwen2 .*, qwen3"):
        qwenkit.load(good)


def test_weights_do_not_match_config(good):
    config = json.loads((good / "config.json").read_text())
    config["intermediate_size"] = 128
    (good / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tensor model.layers.0.mlp.\w+_proj.weight has shape \(\d+, \d+\) but the config implies "
                                              r"\(\d+, \d+\): config.json and the weights do not match"):
        qwenkit.load(good, dtype="float32")


def test_offline_hub_id(monkeypatch):
    # What a machine without network sees, without waiting for its connection timeouts.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError, match=r"could not download 'Qwen/NoSuchModel-0B' from the Hugging Face hub .*"
                                            r"pass its local directory or .gguf file with -m PATH"):
        qwenkit.load("Qwen/NoSuchModel-0B")


def test_bad_dtype(good):
    with pytest.raises(ValueError, match="unknown dtype 'float8'; use auto, float32"):
        qwenkit.load(good, dtype="float8")
