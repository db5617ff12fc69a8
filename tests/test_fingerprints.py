import pytest

from chatdistill.distill.fingerprints import teacher_fingerprint
from chatdistill.errors import UserError
from chatdistill.hashing import file_sha256

from conftest import build_tiny_model


def test_teacher_fingerprint_changes_with_weights_of_the_same_shape(tmp_path, tokenizer_dir):
    a = build_tiny_model(tmp_path / "a", tokenizer_dir, "llama", 0)
    b = build_tiny_model(tmp_path / "b", tokenizer_dir, "llama", 1)
    assert teacher_fingerprint(a) != teacher_fingerprint(b)
    assert teacher_fingerprint(a) == teacher_fingerprint(a)


def test_teacher_fingerprint_refuses_a_directory_without_a_model(tmp_path):
    with pytest.raises(UserError, match="no config.json or .gguf file there"):
        teacher_fingerprint(tmp_path)


def test_file_sha256_is_the_sha256_of_the_bytes(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(b"abc")
    assert file_sha256(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
