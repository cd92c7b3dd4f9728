"""A new user's first commands: they work, or stop at once with one message naming the flag or file at fault."""
import pytest

import pagedllm
from pagedllm.cli import main


def test_version_prints_the_package_version(capsys):
    """`pagedllm --version` (vLLM's `vllm --version`) was 'the following arguments are required: command'."""
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"pagedllm {pagedllm.__version__}"


@pytest.mark.parametrize("given, words", [
    ("meta-llama/Llama-3.1-8B-Instruct", ["'meta-llama/Llama-3.1-8B-Instruct'", "not a local directory",
                                          "does not download", "hf download meta-llama/Llama-3.1-8B-Instruct"]),
    ("/no/such/model", ["'/no/such/model'", "not a local directory"]),
])
def test_a_model_that_is_not_a_local_directory_says_so(given, words, capsys):
    """A Hub id (vLLM would download it) or a path that is not there: was "model directory ... has no
    config.json", as if the directory existed."""
    assert main(["generate", "--device", "cpu", "--model", given]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def test_a_model_file_is_not_a_model_directory(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["generate", "--device", "cpu", "--model", str(tmp_path / "config.json")]) == 2
    assert "is a file: give the directory that holds config.json" in capsys.readouterr().err


def test_a_tokenizer_path_that_is_not_there_says_so(capsys):
    """Was transformers' "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    assert main(["generate", "--device", "cpu", "--tokenizer", "/no/such/tok"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer '/no/such/tok' is not a local directory" in err and "Repo id" not in err, err


def test_an_architecture_transformers_does_not_know_is_unsupported_listing_ours(tmp_path, capsys):
    """Was transformers' 'does not recognize this architecture ... pip install --upgrade transformers', which
    would not have made pagedllm run it."""
    (tmp_path / "config.json").write_text('{"architectures": ["FoobarForCausalLM"], "model_type": "foobar"}')
    assert main(["generate", "--device", "cpu", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert ("unsupported model architectures ['FoobarForCausalLM']; supported: ['Gemma2ForCausalLM', "
            "'Gemma3ForCausalLM', 'Gemma3ForConditionalGeneration', 'GemmaForCausalLM', "
            "'GraniteForCausalLM'") in err, err
    assert "upgrade" not in err


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model-q4_k_m.gguf"])
def test_a_checkpoint_without_safetensors_names_what_it_found(tmp_path, weights, capsys):
    """Was only 'model.safetensors not found', when the directory holds weights in a format not read here."""
    import shutil
    from pagedllm.config import DEMO_MODEL
    shutil.copytree(DEMO_MODEL, tmp_path / "m", ignore=shutil.ignore_patterns("*.safetensors"))
    (tmp_path / "m" / weights).write_bytes(b"x")
    assert main(["generate", "--device", "cpu", "--model", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert f"found {weights}, but only safetensors checkpoints are read" in err, err
