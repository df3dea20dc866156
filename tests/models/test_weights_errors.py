"""Bad input to the weight loaders: one CheckpointError that names the file and the problem, nothing half-loaded,
and pickle files never unpickled."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import convert, weight_reading, weight_sources, weights
from models.config import PreviewerConfig, StageAConfig, StageBConfig, StageCConfig
from models.previewer import Previewer
from models.stage_a import StageA
from models.stage_b import StageB
from models.stage_c import StageC

CheckpointError = weights.CheckpointError


def official_file(tmp_path: Path, network, name: str) -> Path:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path))
    return path


@pytest.fixture
def stage_c_file(tmp_path: Path) -> Path:
    return official_file(tmp_path, StageC(StageCConfig.tiny()), "stage_c_lite.safetensors")


@pytest.fixture
def stage_b_file(tmp_path: Path) -> Path:
    return official_file(tmp_path, StageB(StageBConfig.tiny()), "stage_b_lite.safetensors")


@pytest.fixture
def no_data_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail loudly if the loader maps any file: errors must come from headers alone (nothing half-loaded)."""
    calls: list[str] = []

    def forbidden(path, *args, **kwargs):
        calls.append(str(path))
        raise AssertionError(
            f"tensor data of {path} was opened before the checkpoint was validated"
        )

    monkeypatch.setattr(weight_reading, "MappedFile", forbidden)
    monkeypatch.setattr(weight_reading, "safe_open", forbidden)
    return calls


def rewrite(src: Path, dst: Path, edit) -> Path:
    sd = dict(load_file(str(src)))
    edit(sd)
    save_file(sd, str(dst))
    return dst


# ------------------------------------------------------------------------------------------- paths


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file") as e:
        weights.load_stage_c(tmp_path / "stage_c_lite.safetensors")
    assert str(tmp_path / "stage_c_lite.safetensors") in str(e.value)


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="without config.json") as e:
        weights.load_stage_b(tmp_path)
    assert str(tmp_path) in str(e.value)


# --------------------------------------------------------------------------------------- corrupt files


def test_truncated_file(stage_c_file: Path, tmp_path: Path, no_data_reads: list[str]) -> None:
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(stage_c_file.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated") as e:
        weights.load_stage_c(cut)
    assert str(cut) in str(e.value) and not no_data_reads


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "too short"),
        (b"\x01\x02", "too short"),
        (bytes(range(256)) * 4, "not a valid safetensors file"),
        (
            (20).to_bytes(8, "little") + b"{not json at all!!!" + b"\0" * 64,
            "corrupt safetensors header",
        ),
        (
            (64).to_bytes(8, "little")
            + json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}})
            .encode()
            .ljust(64)
            + b"\0" * 64,
            "byte range",
        ),
        (
            (64).to_bytes(8, "little")
            + json.dumps({"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}})
            .encode()
            .ljust(64)
            + b"\0" * 64,
            "corrupt safetensors header entry",
        ),
    ],
)
def test_corrupt_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "stage_c.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as e:
        weights.load_stage_c(path)
    assert str(path) in str(e.value)


# ------------------------------------------------------------------------------------ wrong contents


def test_file_of_another_stage(
    stage_b_file: Path, tmp_path: Path, no_data_reads: list[str]
) -> None:
    with pytest.raises(CheckpointError) as e:
        weights.load_stage_c(stage_b_file)
    msg = str(e.value)
    assert str(stage_b_file) in msg and "Stage B (decoder)" in msg and "load_stage_b" in msg
    preview = official_file(tmp_path, Previewer(PreviewerConfig.tiny()), "previewer.safetensors")
    with pytest.raises(
        CheckpointError, match="looks like a Previewer checkpoint.*use load_previewer"
    ):
        weights.load_effnet(preview)
    with pytest.raises(CheckpointError, match="looks like a Stage B .*not a Stage A"):
        weights.load_stage_a(stage_b_file)
    assert not no_data_reads


def test_unknown_key(stage_c_file: Path, tmp_path: Path, no_data_reads: list[str]) -> None:
    bad = rewrite(
        stage_c_file,
        tmp_path / "extra.safetensors",
        lambda sd: sd.update({"extra.weight": torch.ones(2)}),
    )
    with pytest.raises(CheckpointError, match="1 unexpected keys: extra.weight") as e:
        weights.load_stage_c(bad)
    assert str(bad) in str(e.value) and not no_data_reads


def test_missing_keys_listed_first_few(
    stage_c_file: Path, tmp_path: Path, no_data_reads: list[str]
) -> None:
    def drop(sd):
        del sd["clf.1.bias"]
        for k in [k for k in sd if k.startswith("down_blocks.0.0.channelwise")]:
            del sd[k]

    bad = rewrite(stage_c_file, tmp_path / "missing.safetensors", drop)
    with pytest.raises(
        CheckpointError, match=r"7 missing keys: down_blocks\.0\.0\.channelwise.*\(\+2 more\)"
    ) as e:
        weights.load_stage_c(bad)
    assert str(bad) in str(e.value) and not no_data_reads


def test_shape_mismatch(stage_b_file: Path, tmp_path: Path, no_data_reads: list[str]) -> None:
    key = "down_blocks.0.0.channelwise.4.bias"
    bad = rewrite(
        stage_b_file, tmp_path / "shape.safetensors", lambda sd: sd.update({key: torch.zeros(15)})
    )
    with pytest.raises(
        CheckpointError, match=rf"1 shape mismatches: {key} \(file \[15\], model \[16\]\)"
    ) as e:
        weights.load_stage_b(bad)
    assert str(bad) in str(e.value) and not no_data_reads


def test_integer_buffer_stored_as_float(tmp_path: Path, no_data_reads: list[str]) -> None:
    src = official_file(tmp_path, StageA(StageAConfig.tiny()), "stage_a.safetensors")
    key = "down_blocks.3.1.num_batches_tracked"
    bad = rewrite(src, tmp_path / "a.safetensors", lambda sd: sd.update({key: sd[key].float()}))
    with pytest.raises(CheckpointError, match=f"dtype mismatches: {key}"):
        weights.load_stage_a(bad)


def test_inconsistent_shapes_stop_inference(stage_c_file: Path, tmp_path: Path) -> None:
    def odd_pooled(sd):
        sd["clip_txt_pooled_mapper.weight"] = torch.zeros(100, 32)

    bad = rewrite(stage_c_file, tmp_path / "odd.safetensors", odd_pooled)
    with pytest.raises(CheckpointError, match="clip_seq") as e:
        weights.load_stage_c(bad)
    assert str(bad) in str(e.value)

    def unknown_cond(sd):
        for k in [k for k in sd if ".mapper_crp." in k]:
            sd[k.replace("mapper_crp", "mapper_xyz")] = sd.pop(k)

    bad = rewrite(stage_c_file, tmp_path / "cond.safetensors", unknown_cond)
    with pytest.raises(CheckpointError, match=r"\['xyz'\]: unknown condition"):
        weights.load_stage_c(bad)


def test_explicit_config_must_match(stage_c_file: Path) -> None:
    with pytest.raises(CheckpointError, match="shape mismatches"):
        weights.load_stage_c(stage_c_file, config=StageCConfig.lite())


def test_float16_refused(stage_c_file: Path) -> None:
    with pytest.raises(ValueError, match="float16.*overflow"):
        weights.load_stage_c(stage_c_file, dtype=torch.float16)


# ------------------------------------------------------------------------------------------- pickles


class _Detonator:
    """Unpickling this creates a marker directory: proof that a file was (or was not) unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize(
    "name", ["stage_c.ckpt", "model.pt", "model.pth", "pytorch_model.bin", "stage_c.safetensors"]
)
def test_pickle_is_never_unpickled(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "unpickled"
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"state_dict": _Detonator(marker)}, protocol=4))
    with pytest.raises(CheckpointError, match="pickle") as e:
        weights.load_stage_c(path)
    assert "safetensors" in str(e.value) and str(path) in str(e.value)
    assert not marker.exists()


def test_torch_save_zip_named_safetensors_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    path = tmp_path / "stage_b.safetensors"
    torch.save({"w": _Detonator(marker)}, path)
    with pytest.raises(CheckpointError, match="pickle / torch.save"):
        weights.load_stage_b(path)
    assert not marker.exists()


# ----------------------------------------------------------------------------------- diffusers folders


def diffusers_folder(path: Path, config: dict, sd: dict, shards: int = 1) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    keys = list(sd)
    if shards == 1:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path / weight_sources.DIFFUSERS_WEIGHTS))
        return path
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: sd[k].contiguous() for k in part}, str(path / name))
        weight_map.update({k: name for k in part})
    (path / weight_sources.DIFFUSERS_INDEX).write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return path


@pytest.fixture
def decoder_folder(tmp_path: Path) -> Path:
    cfg = StageBConfig.tiny()
    sd = convert.unet_official_to_diffusers(StageB(cfg).state_dict())
    return diffusers_folder(
        tmp_path / "decoder_lite", convert.stage_b_config_to_diffusers(cfg), sd, shards=3
    )


def test_diffusers_folder_of_another_stage(decoder_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="Stage B.*use load_stage_b") as e:
        weights.load_stage_c(decoder_folder)
    assert str(decoder_folder) in str(e.value)
    with pytest.raises(CheckpointError, match="not the PaellaVQModel"):
        weights.load_stage_a(decoder_folder)
    with pytest.raises(CheckpointError, match="no diffusers layout"):
        weights.load_previewer(decoder_folder)
    # The folder itself is fine.
    assert weights.load_stage_b(decoder_folder).config == StageBConfig.tiny()


def test_diffusers_missing_shard(decoder_folder: Path) -> None:
    shard = min(decoder_folder.glob("*-00002-of-00003.safetensors"))
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing.*00002-of-00003"):
        weights.load_stage_b(decoder_folder)


def test_diffusers_config_does_not_match_weights(
    decoder_folder: Path, no_data_reads: list[str]
) -> None:
    cfg = json.loads((decoder_folder / "config.json").read_text())
    cfg["block_out_channels"] = [16, 32, 64, 128]
    (decoder_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape mismatches") as e:
        weights.load_stage_b(decoder_folder)
    assert str(decoder_folder) in str(e.value) and not no_data_reads


def test_diffusers_corrupt_config_and_missing_weights(decoder_folder: Path, tmp_path: Path) -> None:
    (decoder_folder / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="unreadable config.json"):
        weights.load_stage_b(decoder_folder)
    empty = tmp_path / "vqgan"
    empty.mkdir()
    (empty / "config.json").write_text(
        json.dumps(convert.stage_a_config_to_diffusers(StageAConfig.tiny()))
    )
    (empty / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04.")
    with pytest.raises(CheckpointError, match="no weights found.*pickle") as e:
        weights.load_stage_a(empty)
    assert str(empty) in str(e.value)


def test_diffusers_weights_file_given_as_official_file(decoder_folder: Path) -> None:
    shard = min(decoder_folder.glob("*.safetensors"))
    with pytest.raises(
        CheckpointError, match="diffusers StableCascadeUNet weights file.*load its folder"
    ) as e:
        weights.load_stage_b(shard)
    assert str(shard) in str(e.value)
