"""Hugging Face file selection (spec §6.4 steps 3–4; DMR's repository GGUF selection cases)."""

from __future__ import annotations

import pytest

from dmr_cli.distribution.huggingface import HFFile, classify, select_files
from dmr_cli.errors import ModelNotFound, RegistryError


def files(*paths: str) -> list[HFFile]:
    return [HFFile(path=p, size=100 + i) for i, p in enumerate(paths)]


def weight_paths(paths: list[str], tag: str) -> list[str]:
    return [f.path for f in select_files(files(*paths), tag).weights]


QUANTS = [
    "model-Q2_K.gguf",
    "model-Q4_K_M.gguf",
    "model-Q4_K_S.gguf",
    "model-Q5_K_M.gguf",
    "model-Q8_0.gguf",
]


@pytest.mark.parametrize("tag", ["", "latest", "main", "LATEST"])
def test_default_tags_pick_q4_k_m(tag: str) -> None:
    selection = select_files(files(*QUANTS), tag)
    assert [f.path for f in selection.weights] == ["model-Q4_K_M.gguf"]
    assert selection.message == "Selected Q4_K_M quantization (default)"


def test_explicit_quantization() -> None:
    selection = select_files(files(*QUANTS), "Q8_0")
    assert [f.path for f in selection.weights] == ["model-Q8_0.gguf"]
    assert selection.message == "Selected Q8_0 quantization"


@pytest.mark.parametrize("tag", ["q5_k_m", "Q5_k_M"])
def test_quantization_is_case_insensitive(tag: str) -> None:
    assert weight_paths(["a-q4_k_m.gguf", "a-Q5_K_M.gguf"], tag) == ["a-Q5_K_M.gguf"]


@pytest.mark.parametrize(
    "name", ["Llama-3.2-1B-Q6_K.gguf", "llama.Q6_K.gguf", "llama_Q6_K.gguf", "llama-Q6_K-v2.gguf"]
)
def test_separators_before_and_after_the_quantization(name: str) -> None:
    assert weight_paths([name, "llama-Q8_0.gguf"], "Q6_K") == [name]


def test_quantization_must_start_after_a_separator() -> None:
    # "XQ6_K" is not a Q6_K file: the quantization must follow -, . or _.
    with pytest.raises(ModelNotFound, match="Q6_K"):
        select_files(files("modelXQ6_K.gguf", "model-Q8_0.gguf"), "Q6_K")


def test_quantization_must_end_at_a_boundary() -> None:
    with pytest.raises(ModelNotFound):
        select_files(files("model-Q4_K_ML.gguf", "model-Q8_0.gguf"), "Q4_K_M")


def test_exact_quantization_beats_a_longer_one() -> None:
    # DMR's rule also lets Q4_K match Q4_K_M (followed by "_"); an exact Q4_K file wins.
    assert weight_paths(["m-Q4_K_M.gguf", "m-Q4_K.gguf", "m-Q4_K_S.gguf"], "Q4_K") == [
        "m-Q4_K.gguf"
    ]
    assert weight_paths(["m-Q4_K_S.gguf", "m-Q8_0.gguf"], "Q4_K") == ["m-Q4_K_S.gguf"]


def test_sharded_quantization_selects_every_shard_in_order() -> None:
    paths = [
        "m-Q8_0-00002-of-00003.gguf",
        "m-Q4_K_M-00002-of-00002.gguf",
        "m-Q8_0-00001-of-00003.gguf",
        "m-Q4_K_M-00001-of-00002.gguf",
        "m-Q8_0-00003-of-00003.gguf",
    ]
    assert weight_paths(paths, "latest") == [
        "m-Q4_K_M-00001-of-00002.gguf",
        "m-Q4_K_M-00002-of-00002.gguf",
    ]
    assert weight_paths(paths, "Q8_0") == [
        "m-Q8_0-00001-of-00003.gguf",
        "m-Q8_0-00002-of-00003.gguf",
        "m-Q8_0-00003-of-00003.gguf",
    ]


def test_quantization_named_directory() -> None:
    paths = ["Q4_K_M/big-00001-of-00002.gguf", "Q4_K_M/big-00002-of-00002.gguf", "big-F16.gguf"]
    assert weight_paths(paths, "q4_k_m") == paths[:2]


def test_incomplete_shard_set_is_an_error() -> None:
    with pytest.raises(ModelNotFound, match="2 of 3 shards"):
        select_files(files("m-Q4_K_M-00001-of-00003.gguf", "m-Q4_K_M-00003-of-00003.gguf"), "")


def test_fallback_is_alphabetically_first_with_its_shards() -> None:
    paths = ["b-Q8_0.gguf", "a-F16-00002-of-00002.gguf", "a-F16-00001-of-00002.gguf"]
    selection = select_files(files(*paths), "latest")
    assert [f.path for f in selection.weights] == [
        "a-F16-00001-of-00002.gguf",
        "a-F16-00002-of-00002.gguf",
    ]
    assert selection.message == "Selected a-F16-00001-of-00002.gguf (no Q4_K_M quantization found)"


def test_explicit_quantization_not_found_lists_the_files() -> None:
    with pytest.raises(ModelNotFound) as err:
        select_files(files(*QUANTS), "IQ3_XS", repo="huggingface.co/org/m")
    assert "huggingface.co/org/m" in err.value.message
    assert err.value.hint is not None and "model-Q8_0.gguf" in err.value.hint


def test_single_model_file_is_used_whatever_the_tag() -> None:
    selection = select_files(files("model.gguf", "README.md"), "Q8_0")
    assert [f.path for f in selection.weights] == ["model.gguf"]
    assert selection.message is None


def test_one_set_of_several_matching_is_chosen() -> None:
    # Two different models with the same quantization are never mixed as if they were shards.
    assert weight_paths(["b-Q4_K_M.gguf", "a-Q4_K_M.gguf", "c-Q8_0.gguf"], "") == ["a-Q4_K_M.gguf"]


def test_mmproj_prefers_f16() -> None:
    paths = ["mmproj-model-BF16.gguf", "mmproj-model-F32.gguf", "mmproj-model-f16.gguf", *QUANTS]
    selection = select_files(files(*paths), "")
    assert selection.mmproj is not None and selection.mmproj.path == "mmproj-model-f16.gguf"
    assert "mmproj-model-f16.gguf" not in [f.path for f in selection.weights]


def test_mmproj_without_f16_takes_the_first() -> None:
    selection = select_files(files("model-Q4_K_M.gguf", "mmproj-Q8_0.gguf", "mmproj-F32.gguf"), "")
    assert selection.mmproj is not None and selection.mmproj.path == "mmproj-F32.gguf"
    assert [f.path for f in selection.weights] == ["model-Q4_K_M.gguf"]


def test_only_projectors_is_an_error() -> None:
    with pytest.raises(ModelNotFound, match="projector"):
        select_files(files("mmproj-f16.gguf"), "")


def test_no_weights_is_an_error() -> None:
    with pytest.raises(ModelNotFound, match="no GGUF, safetensors or DDUF weights"):
        select_files(files("README.md", "config.json", "model.bin"), "latest")


def test_gguf_roles_and_download_list() -> None:
    selection = select_files(
        files(
            "model-Q4_K_M.gguf",
            "model-Q8_0.gguf",
            "mmproj-F16.gguf",
            "template.jinja",
            "LICENSE",
            "NOTICE.md",
            "README.md",
            "tokenizer_config.json",
        ),
        "",
    )
    assert selection.format == "gguf"
    assert selection.chat_template is not None and selection.chat_template.path == "template.jinja"
    assert [f.path for f in selection.licenses] == ["LICENSE", "NOTICE.md"]
    # GGUF carries its own config: README and tokenizer files are not downloaded.
    assert [f.path for f in selection.files] == [
        "model-Q4_K_M.gguf",
        "mmproj-F16.gguf",
        "template.jinja",
        "LICENSE",
        "NOTICE.md",
    ]
    assert selection.total_size == sum(f.size for f in selection.files)


def test_gguf_is_preferred_in_a_mixed_repository() -> None:
    selection = select_files(files("model.safetensors", "gguf/model-Q4_K_M.gguf"), "")
    assert selection.format == "gguf"
    assert [f.path for f in selection.weights] == ["gguf/model-Q4_K_M.gguf"]


def test_safetensors_repository_takes_all_shards_and_configs() -> None:
    selection = select_files(
        files(
            "model-00002-of-00002.safetensors",
            "model-00001-of-00002.safetensors",
            "config.json",
            "tokenizer.model",
            "chat_template.json",
            "LICENSE.txt",
            "script.py",
        ),
        "latest",
    )
    assert selection.format == "safetensors"
    assert [f.path for f in selection.weights] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert [f.path for f in selection.configs] == ["config.json", "tokenizer.model"]
    assert selection.chat_template is not None
    assert selection.chat_template.path == "chat_template.json"
    assert [f.path for f in selection.licenses] == ["LICENSE.txt"]


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("Model-Q4_K_M.GGUF", "gguf"),
        ("sub/model.safetensors", "safetensors"),
        ("pipeline.dduf", "dduf"),
        ("template.jinja", "chat_template"),
        ("chat_template.json", "chat_template"),
        ("LICENSE", "license"),
        ("licence.md", "license"),
        ("COPYING", "license"),
        ("NOTICE", "license"),
        ("README.md", "config"),
        ("vocab.txt", "config"),
        ("tokenizer.model", "config"),
        ("merges.vocab", "config"),
        ("model.py", "other"),
    ],
)
def test_classify(name: str, kind: str) -> None:
    assert classify(name) == kind


def test_tree_entry_parsing() -> None:
    sha = "a" * 64
    lfs = HFFile.from_api(
        {
            "type": "file",
            "path": "d/m.gguf",
            "size": 134,
            "oid": "x",
            "lfs": {"oid": sha, "size": 5000},
        }
    )
    assert (lfs.path, lfs.name, lfs.size, lfs.sha256) == ("d/m.gguf", "m.gguf", 5000, sha)
    plain = HFFile.from_api({"type": "file", "path": "README.md", "size": 12, "oid": "y"})
    assert (plain.size, plain.sha256) == (12, None)


@pytest.mark.parametrize(
    "entry",
    [
        {"type": "file", "path": "../escape.gguf", "size": 1},
        {"type": "file", "path": "/etc/passwd", "size": 1},
        {"type": "file", "path": "a/./b.gguf", "size": 1},
        {"type": "file", "path": "a\\..\\b.gguf", "size": 1},
        {"type": "file", "path": "m.gguf", "size": -1},
        {"type": "file", "path": "m.gguf", "size": 1, "lfs": {"oid": "not-a-digest", "size": 1}},
    ],
)
def test_unsafe_or_malformed_tree_entries_are_refused(entry: dict[str, object]) -> None:
    with pytest.raises(RegistryError):
        HFFile.from_api(entry)
