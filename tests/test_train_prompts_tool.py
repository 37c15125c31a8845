"""`python -m speccompile.train.prompts` on a user's inputs: bad paths and files are one `error:` line (exit 2),
not a traceback; a first round's gen.jsonl or a Magpie file cut off by a stopped run is read up to its last whole
line, and Magpie appends after whole lines only."""
import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from speccompile.errors import SpeccompileError  # noqa: E402
from speccompile.train import prompts  # noqa: E402

from test_train_head import trained  # noqa: E402,F401


def one_error_line(capsys, argv: list[str], *words: str) -> None:
    with pytest.raises(SystemExit) as stopped:
        prompts.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    assert all(w in err[0] for w in words), err[0]


def test_bad_inputs_one_error_line(trained, tmp_path, capsys):
    tokenizer = str(trained / "hf" / "tokenizer.json")
    one_error_line(capsys, ["--n", "3", "--out", str(tmp_path / "missing" / "p.jsonl")], "No such file",
                   "missing")
    one_error_line(capsys, ["--second-round", str(tmp_path / "nothing.jsonl"), "--tokenizer", tokenizer],
                   "nothing.jsonl")
    one_error_line(capsys, ["--second-round", str(trained / "prompts.jsonl"), "--tokenizer", tokenizer],
                   "line 1: not a record of the gen stage")
    one_error_line(capsys, ["--second-round", str(trained / "work" / "gen.jsonl"), "--tokenizer",
                            str(tmp_path / "tok.json")], "--tokenizer", "tok.json")
    with pytest.raises(SystemExit) as stopped:  # a usage error: argparse's usage and its error line
        prompts.main(["--second-round", str(trained / "work" / "gen.jsonl")])
    assert stopped.value.code == 2 and "error: --second-round needs --tokenizer" in capsys.readouterr().err


def test_second_round_reads_a_gen_file_cut_off_mid_line(trained, tmp_path):
    gen = tmp_path / "gen.jsonl"
    whole = (trained / "work" / "gen.jsonl").read_bytes()
    gen.write_bytes(whole + whole.splitlines(keepends=True)[0][:30])  # a run stopped while writing a line
    items = prompts.second_round(str(gen), str(trained / "hf" / "tokenizer.json"), 10)
    assert items == prompts.second_round(str(trained / "work" / "gen.jsonl"), str(trained / "hf" / "tokenizer.json"),
                                         10)


def test_magpie_continues_after_whole_lines_only(trained, tmp_path):
    """A Magpie file whose last line was cut off is cut back to its whole lines (a whole last line without its
    newline gets one), so what the next run appends stays one record a line; a file Magpie did not write is
    refused before the target loads."""
    kept = [json.dumps({"prompt": f"please write about subject {i}", "source": "magpie"}) for i in range(2)]
    out = tmp_path / "magpie.jsonl"
    out.write_text(kept[0] + "\n" + kept[1][:25])
    assert prompts.magpie(str(trained / "hf"), 1, str(out), log=lambda _: None, dtype="float32") == 1
    assert out.read_text() == kept[0] + "\n"
    out.write_text(kept[0] + "\n" + kept[1])
    assert prompts.magpie(str(trained / "hf"), 2, str(out), log=lambda _: None, dtype="float32") == 2
    assert out.read_text() == kept[0] + "\n" + kept[1] + "\n"
    plain = tmp_path / "mine.txt"
    plain.write_text(kept[0] + "\na plain-text prompt of mine\n")
    with pytest.raises(SpeccompileError, match="line 2: not a user turn"):
        prompts.magpie(str(tmp_path / "no-model"), 2, str(plain))
