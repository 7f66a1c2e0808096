"""Config: CLI > TOML > defaults, override syntax, errors that name the flag, round trip, shipped configs."""

import tomllib
from pathlib import Path

import pytest

from trainer.config import (
    Config,
    ConfigError,
    check_output_folders,
    config_from_dict,
    dump_toml,
    load_config,
    parse_overrides,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs").glob("*.toml"))


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_without_file_or_overrides():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.train.epochs == 5 and cfg.optim.sparse_lr == 0.01


def test_precedence_cli_over_toml_over_defaults(tmp_path):
    path = write_toml(tmp_path / "c.toml", "[train]\nepochs = 7\nbatch_size = 64\n[optim]\nsparse_lr = 0.5\n")
    cfg = load_config(path, ["--train.epochs", "9"])
    assert cfg.train.epochs == 9  # CLI beats the file
    assert cfg.train.batch_size == 64  # file beats the default
    assert cfg.optim.sparse_lr == 0.5
    assert cfg.train.seed == Config().train.seed  # default where neither says anything


@pytest.mark.parametrize("argv", [["--train.epochs=3"], ["--train.epochs", "3"]])
def test_override_forms(argv):
    assert load_config(None, argv).train.epochs == 3


def test_parse_overrides_mixed_forms_and_value_with_equals():
    out = parse_overrides(["--a.b=v", "--c.d", "w", "--data.token_pattern=[a=b]+"])
    assert out == [("a", "b", "v"), ("c", "d", "w"), ("data", "token_pattern", "[a=b]+")]


def test_override_types_are_coerced():
    cfg = load_config(
        None,
        [
            "--embeddings.freeze_pretrained",
            "false",
            "--optim.dense_lr",
            "1e-2",
            "--train.batch_size",
            "1_024",
            "--data.text_column",
            "body",
        ],
    )
    assert cfg.embeddings.freeze_pretrained is False
    assert cfg.optim.dense_lr == pytest.approx(0.01)
    assert cfg.train.batch_size == 1024
    assert cfg.data.text_column == "body"


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--nosuch.field", "1"], "nosuch.field"),
        (["--train.nosuch", "1"], "train.nosuch"),
        (["--train.epochs", "abc"], "train.epochs"),
        (["--optim.sparse_lr", "fast"], "optim.sparse_lr"),
        (["--embeddings.freeze_pretrained", "maybe"], "embeddings.freeze_pretrained"),
        (["--optim.sparse_lr", "-1"], "optim.sparse_lr"),
        (["--optim.sparse_lr", "0"], "optim.sparse_lr"),
        (["--optim.dense_lr", "0"], "optim.dense_lr"),
        (["--optim.dense_lr", "inf"], "optim.dense_lr"),
        (["--optim.pretrained_lr", "nan"], "optim.pretrained_lr"),
        (["--train.seed", "-1"], "train.seed"),
        (["--model.wide", "words,trigrams"], "model.wide"),
        (["--model.wide", "words,words"], "model.wide"),
        (["--model.wide", "words", "--model.encoder", "lstm"], "model.wide"),
        (["--model.wide", "bigrams"], "model.wide"),
        (["--model.wide", "chars", "--embeddings.ngram_buckets", "8"], "model.wide"),
        (["--model.deep_chars", "false", "--embeddings.char_ngrams", "8"], "model.deep_chars"),
        (["--optim.wide_lr", "0"], "optim.wide_lr"),
        (["--train.seed", str(2**32)], "train.seed"),
        (["--model.encoder", "transformer"], "model.encoder"),
        (["--train.epochs", "0"], "train.epochs"),
        (["--train.epochs"], "train.epochs"),
        (["--data.token_pattern", "("], "data.token_pattern"),
        (["--data.token_pattern", ""], "data.token_pattern"),
        (["--data.token_pattern", r"\w*"], "data.token_pattern"),
        (["--data.token_pattern", r"\b"], "data.token_pattern"),
        (["--data.token_pattern", r"(?=\w)"], "data.token_pattern"),
        (["--data.text_column", "label"], "data.text_column"),
    ],
)
def test_errors_name_the_flag(argv, flag):
    with pytest.raises(ConfigError) as exc:
        load_config(None, argv)
    assert flag in str(exc.value)


def test_unknown_key_in_toml_names_flag_and_file(tmp_path):
    path = write_toml(tmp_path / "c.toml", "[train]\nepochz = 3\n")
    with pytest.raises(ConfigError, match=r"train\.epochz") as exc:
        load_config(path)
    assert str(path) in str(exc.value)


def test_unknown_section_in_toml(tmp_path):
    path = write_toml(tmp_path / "c.toml", "[trainz]\nepochs = 3\n")
    with pytest.raises(ConfigError, match=r"trainz\.epochs: unknown section"):
        load_config(path)


def test_wrong_type_in_toml(tmp_path):
    path = write_toml(tmp_path / "c.toml", '[train]\nepochs = "many"\n')
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer"):
        load_config(path)
    path = write_toml(tmp_path / "d.toml", "[train]\nepochs = true\n")
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(path)


def test_missing_and_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="--config: file not found"):
        load_config(tmp_path / "absent.toml")
    bad = write_toml(tmp_path / "bad.toml", "[train\nepochs = 3\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="--config: .*: cannot read it"):
        load_config(tmp_path)  # a folder: was an IsADirectoryError traceback
    utf16 = tmp_path / "utf16.toml"
    utf16.write_text("[train]\nepochs = 3\n", encoding="utf-16")
    with pytest.raises(ConfigError, match="is UTF-16 text; save it as UTF-8"):
        load_config(utf16)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('[run]\ndir = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(latin1)


def test_a_utf8_byte_order_mark_is_read_and_a_top_level_setting_names_its_section(tmp_path):
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf[train]\nepochs = 3\n")
    assert load_config(bom).train.epochs == 3
    with pytest.raises(ConfigError, match=r"`epochs = \.\.\.` is outside any \[section\].*belongs in \[train\]"):
        load_config(write_toml(tmp_path / "top.toml", "epochs = 2\n"))
    with pytest.raises(ConfigError, match=r"`nosuch = \.\.\.` is outside any \[section\].*sections: data, "):
        load_config(write_toml(tmp_path / "top2.toml", "nosuch = 2\n"))


def test_bare_value_is_not_an_override():
    with pytest.raises(ConfigError, match="expected --section.field"):
        load_config(None, ["epochs=3"])


def test_unfreeze_needs_frozen_pretrained():
    with pytest.raises(ConfigError, match=r"embeddings\.unfreeze_after_steps"):
        load_config(
            None, ["--embeddings.unfreeze_after_steps", "10", "--embeddings.freeze_pretrained", "false"]
        )
    # each alone is fine
    assert (
        load_config(None, ["--embeddings.unfreeze_after_steps", "10"]).embeddings.unfreeze_after_steps == 10
    )
    assert (
        load_config(None, ["--embeddings.freeze_pretrained", "false"]).embeddings.freeze_pretrained is False
    )


def test_lstm_rejects_bigram_buckets():
    with pytest.raises(ConfigError, match=r"embeddings\.ngram_buckets"):
        load_config(None, ["--model.encoder", "lstm", "--embeddings.ngram_buckets", "100"])
    assert (
        load_config(None, ["--model.encoder", "lstm", "--embeddings.char_ngrams", "100"]).model.encoder
        == "lstm"
    )


def test_batch_size_and_token_budget_cannot_both_be_zero():
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(None, ["--train.batch_size", "0"])
    cfg = load_config(None, ["--train.batch_size", "0", "--train.tokens_per_batch", "500"])
    assert cfg.train.tokens_per_batch == 500


def test_pretrained_trainable_property():
    assert not load_config(
        None, ["--embeddings.unfreeze_after_steps", "3"]
    ).pretrained_trainable  # no vectors
    assert load_config(
        None, ["--embeddings.pretrained", "v.txt", "--embeddings.unfreeze_after_steps", "3"]
    ).pretrained_trainable
    assert load_config(
        None, ["--embeddings.pretrained", "v.txt", "--embeddings.freeze_pretrained", "0"]
    ).pretrained_trainable
    assert not load_config(None, ["--embeddings.pretrained", "v.txt"]).pretrained_trainable


def test_resolved_config_round_trips(tmp_path):
    path = write_toml(
        tmp_path / "c.toml", "[model]\nencoder = 'masked_bag'\n[embeddings]\nchar_ngrams = 1000\n"
    )
    cfg = load_config(
        path, ["--optim.schedule", "cosine", "--data.token_pattern", r"[a-z]+", "--train.seed", "7"]
    )
    text = dump_toml(cfg)
    back = config_from_dict(tomllib.loads(text))
    assert back == cfg
    assert dump_toml(back) == text
    # and through a file, as the run folder stores it
    saved = write_toml(tmp_path / "resolved.toml", text)
    assert load_config(saved) == cfg


def test_saved_config_with_unknown_key_is_rejected():
    doc = tomllib.loads(dump_toml(Config()))
    doc["train"]["legacy_flag"] = 1
    with pytest.raises(ConfigError, match=r"train\.legacy_flag"):
        config_from_dict(doc)


def test_help_config_documents_every_field():
    from dataclasses import fields

    from trainer.config import SECTIONS, describe_fields

    text = describe_fields()
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            assert f"{section}.{f.name} (" in text


def test_there_are_shipped_configs():
    assert SHIPPED, "configs/*.toml: no shipped configs found"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_parses(path):
    cfg = load_config(path)
    assert cfg.data.train, f"{path.name}: no data.train"
    assert config_from_dict(tomllib.loads(dump_toml(cfg))) == cfg


def test_output_folders_that_are_files_name_the_setting(tmp_path):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    check_output_folders(load_config(None, ["--run.dir", str(tmp_path / "new" / "run")]))  # creatable: fine
    for argv, message in (
        (["--run.dir", str(a_file)], f"run.dir: {a_file} is a file, not a folder"),
        (["--run.dir", str(a_file / "sub")], f"run.dir: {a_file / 'sub'} cannot be made: {a_file} is a file"),
        (["--data.cache_dir", str(a_file)], f"data.cache_dir: {a_file} is a file, not a folder"),
    ):
        with pytest.raises(ConfigError) as exc:
            check_output_folders(load_config(None, ["--run.dir", str(tmp_path / "r"), *argv]))
        assert message in str(exc.value)
