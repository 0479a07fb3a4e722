"""Trace loaders: the shipped Azure traces, each format's round trip, and every bad-input case."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from simcolo.errors import ConfigError, TraceError
from simcolo.paths import TRACES_DIR
from simcolo.workload.loaders import read_trace

CONV = TRACES_DIR / "AzureLLMInferenceTrace_conv.csv"
CODE = TRACES_DIR / "AzureLLMInferenceTrace_code.csv"


def load(path, fmt, chunksize=65536):
    chunks = list(read_trace(path, fmt, chunksize))
    frame = pd.concat(chunks, ignore_index=True)
    failed = sum(len(c.attrs["failed_lines"]) for c in chunks)
    return frame, failed


def write(tmp_path, name, text, newline="\n"):
    path = tmp_path / name
    path.write_bytes(text.replace("\n", newline).encode())
    return path


# --- the real traces ------------------------------------------------------------------------------------

def test_conv_trace_matches_sources_md():
    df, failed = load(CONV, "azure")
    assert list(df.columns) == ["arrival_s", "prompt_tokens", "output_tokens", "line"]
    assert df.dtypes.to_dict() == {"arrival_s": np.float64, "prompt_tokens": np.int64,
                                   "output_tokens": np.int64, "line": np.int64}
    assert len(df) == 19_366 and failed == 0
    assert df.arrival_s.iloc[0] == 0.0
    assert df.arrival_s.iloc[-1] == pytest.approx(3_501.72, abs=0.01)   # 18:15:46.68 -> 19:14:08.40
    assert (np.diff(df.arrival_s) >= 0).all()
    assert df.prompt_tokens.mean() == pytest.approx(1_155, abs=1)
    assert df.output_tokens.mean() == pytest.approx(211, abs=1)
    assert df.prompt_tokens.max() == 14_050 and df.output_tokens.max() == 1_000
    assert df.line.iloc[0] == 2 and df.line.iloc[-1] == 19_367
    # 7 fractional digits are kept: the second row is at 18:15:50.9951690
    assert df.arrival_s.iloc[1] == pytest.approx(50.9951690 - 46.6805900, abs=1e-9)


def test_code_trace_matches_sources_md():
    df, _ = load(CODE, "azure")
    assert len(df) == 8_819
    assert df.arrival_s.iloc[-1] == pytest.approx(3_436, abs=1)
    assert df.prompt_tokens.mean() == pytest.approx(2_048, abs=1)
    assert df.output_tokens.mean() == pytest.approx(27.9, abs=0.1)


def test_tiny_chunks_give_the_same_rows(tmp_path):
    head = b"".join(CONV.read_bytes().splitlines(keepends=True)[:400])   # header + 399 rows, CRLF
    path = tmp_path / "conv_head.csv"
    path.write_bytes(head.rstrip(b"\r\n"))                               # no trailing newline, like the original
    small, _ = load(path, "azure", chunksize=7)
    big, _ = load(path, "azure")
    assert len(small) == 399
    pd.testing.assert_frame_equal(small, big)


def test_azure_timestamps_with_utc_offset(tmp_path):
    path = write(tmp_path, "week.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                 "2024-05-10 00:00:00.0000000+00:00,10,2\n2024-05-10 00:00:01.5000000+00:00,20,3\n")
    df, _ = load(path, "azure")
    assert df.arrival_s.tolist() == [0.0, 1.5]


MIXED_2024 = ("TIMESTAMP,ContextTokens,GeneratedTokens\n"
              "2024-05-12 00:00:00+00:00,10,2\n"            # the first row on a whole second
              "2024-05-12 00:00:00.001163+00:00,20,3\n"
              "2024-05-12 00:00:01+00:00,30,4\n"
              "2024-05-12 00:00:01.5+00:00,40,5\n"
              "2024-05-12 00:00:02+00:00,50,6\n"
              "2024-05-12 00:00:03+00:00,60,7\n")


@pytest.mark.parametrize("chunksize", [1, 2, 3, 4, 65536])
def test_azure_2024_timestamps_with_and_without_fractional_seconds(tmp_path, chunksize):
    """The 2024 Azure traces write ``.001163`` but drop the fraction on a whole second: both parse, in one
    chunk and across chunk boundaries (chunks of 2 start with a whole-second row, of 3 and 4 with a fraction)."""
    df, _ = load(write(tmp_path, "azure_2024.csv", MIXED_2024), "azure", chunksize)
    assert df.arrival_s.tolist() == [0.0, 0.001163, 1.0, 1.5, 2.0, 3.0]
    assert df.prompt_tokens.tolist() == [10, 20, 30, 40, 50, 60] and df.line.tolist() == [2, 3, 4, 5, 6, 7]
    plain = MIXED_2024.replace("+00:00", "")          # the same without the offset (the 2023 traces' form)
    df, _ = load(write(tmp_path, "azure_naive.csv", plain), "azure", chunksize)
    assert df.arrival_s.tolist() == [0.0, 0.001163, 1.0, 1.5, 2.0, 3.0]


@pytest.mark.parametrize("bad, why", [("2024-05-12 25:00:02+00:00", "hour 25"),
                                      ("12/05/2024 00:00:02+00:00", "another date order"),
                                      ("2024-05-12 00:00:02.5", "no offset in a file with offsets"),
                                      ("2024-05-12T00:00:02+00:00", "a T between date and time")])
@pytest.mark.parametrize("chunksize", [1, 3, 65536])
def test_a_malformed_timestamp_among_mixed_ones_names_file_and_line(tmp_path, bad, why, chunksize):
    lines = MIXED_2024.splitlines(keepends=True)
    lines[5] = f"{bad},50,6\n"                         # line 6 of the file
    path = write(tmp_path, "azure_bad.csv", "".join(lines))
    with pytest.raises(TraceError) as err:
        load(path, "azure", chunksize)
    message = str(err.value)
    assert message.startswith(f"{path}: line 6, column 'TIMESTAMP': unparsable timestamp {bad!r}"), (why, message)
    assert "\n" not in message


# --- a file of another format than the one named --------------------------------------------------------

SHAPES = {   # format: (file name, text)
    "azure": ("az.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,10,2\n"),
    "burstgpt": ("burst.csv", "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n5,M,10,2,12,x\n"),
    "csv": ("plain.csv", "arrival_s,prompt_tokens,output_tokens\n0.0,10,2\n"),
    "mooncake": ("mooncake.jsonl", ('{"timestamp": 27482, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47]}\n'
                                    '{"timestamp": 30535, "input_length": 6472, "output_length": 26, "hash_ids": [46, 52]}\n')),
}


@pytest.mark.parametrize("actual, named", [(a, n) for a in sorted(SHAPES) for n in sorted(SHAPES) if a != n])
def test_a_file_of_another_format_suggests_that_format(tmp_path, actual, named):
    name, text = SHAPES[actual]
    path = write(tmp_path, name, text)
    assert len(load(path, actual)[0]) >= 1                 # it is a valid trace of its own format
    with pytest.raises(TraceError) as err:
        read_trace(path, named)
    message = str(err.value)
    assert message.startswith(f"{path}: line 1") and message.endswith(f": set format={actual}"), message
    assert "\n" not in message
    if actual == "mooncake":     # JSON fragments are not listed as "found columns"
        assert "found columns" not in message and "a JSON object with keys" in message


def test_a_file_of_no_known_format_gets_no_suggestion(tmp_path):
    path = write(tmp_path, "other.csv", "time,tokens_in,tokens_out\n0,1,1\n")
    for fmt in ("azure", "burstgpt", "csv"):
        with pytest.raises(TraceError, match=r"missing column") as err:
            read_trace(path, fmt)
        assert "looks like" not in str(err.value)
    with pytest.raises(TraceError, match=r"line 1, column '-': invalid JSON"):     # the streaming reader's error
        load(path, "mooncake")


# --- round trips of each format ---------------------------------------------------------------------

def test_plain_csv_round_trip(tmp_path):
    path = write(tmp_path, "plain.csv", "arrival_s,prompt_tokens,output_tokens\n2.5,10,5\n3.0,20,6\n3.0,30,7\n")
    df, _ = load(path, "csv")
    assert df.arrival_s.tolist() == [0.0, 0.5, 0.5]
    assert df.prompt_tokens.tolist() == [10, 20, 30] and df.output_tokens.tolist() == [5, 6, 7]
    assert df.line.tolist() == [2, 3, 4]


def test_mooncake_round_trip_ms_to_s(tmp_path):
    rows = [{"timestamp": 1000, "input_length": 100, "output_length": 10, "hash_ids": [1, 2]},
            {"timestamp": 1500, "input_length": 200, "output_length": 20},
            {"timestamp": 4000, "input_length": 300, "output_length": 30, "hash_ids": []}]
    path = write(tmp_path, "mc.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    df, _ = load(path, "mooncake", chunksize=2)
    assert df.arrival_s.tolist() == [0.0, 0.5, 3.0]
    assert df.prompt_tokens.tolist() == [100, 200, 300] and df.output_tokens.tolist() == [10, 20, 30]
    assert df.line.tolist() == [1, 2, 3]


BURST_HEADER = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"


def test_burstgpt_round_trip_drops_and_counts_failures(tmp_path):
    path = write(tmp_path, "burst.csv", BURST_HEADER +
                 "5.0,ChatGPT,100,10,110,Conversation log\n"
                 "6.0,GPT-4,50,0,50,Conversation log\n"        # failed request
                 "6.0,ChatGPT,70,7,77,API log\n"               # models interleaved, time still sorted
                 "8.5,GPT-4,0,0,0,Conversation log\n"          # failed, no prompt either
                 "9.0,GPT-4,30,3,33,API log\n")
    df, failed = load(path, "burstgpt", chunksize=2)
    assert failed == 2
    assert df.arrival_s.tolist() == [0.0, 1.0, 4.0]
    assert df.prompt_tokens.tolist() == [100, 70, 30] and df.output_tokens.tolist() == [10, 7, 3]
    assert df.line.tolist() == [2, 4, 6]


def test_burstgpt_needs_only_the_first_four_columns(tmp_path):
    path = write(tmp_path, "burst4.csv", "Timestamp,Model,Request tokens,Response tokens\n1,ChatGPT,5,6\n")
    df, _ = load(path, "burstgpt")
    assert df.prompt_tokens.tolist() == [5]


def test_trailing_blank_lines_are_tolerated(tmp_path):
    path = write(tmp_path, "blank_end.csv", "arrival_s,prompt_tokens,output_tokens\n0,1,1\n1,2,2\n\n\n", newline="\r\n")
    df, _ = load(path, "csv", chunksize=2)
    assert len(df) == 2


# --- bad input: each a TraceError naming the file and the line -------------------------------------

AZ = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
T0, T1, T2 = "2023-11-16 18:15:46.6805900", "2023-11-16 18:15:47.0000000", "2023-11-16 18:15:48.0000000"
PLAIN = "arrival_s,prompt_tokens,output_tokens\n"

BAD = {
    # name: (format, text, line, words the message must contain)
    "azure_bad_timestamp": ("azure", AZ + f"{T0},1,1\n2023-11-16 25:99:00.0000000,1,1\n", 3, ["TIMESTAMP", "unparsable timestamp"]),
    "azure_empty_timestamp": ("azure", AZ + f"{T0},1,1\n{T1},1,1\n,1,1\n", 4, ["TIMESTAMP", "empty cell"]),
    "azure_backwards": ("azure", AZ + f"{T0},1,1\n{T2},1,1\n{T1},1,1\n", 4, ["TIMESTAMP", "backwards", "line 3"]),
    "azure_zero_prompt": ("azure", AZ + f"{T0},0,1\n", 2, ["ContextTokens", ">= 1"]),
    "azure_zero_output": ("azure", AZ + f"{T0},5,1\n{T1},5,0\n", 3, ["GeneratedTokens", ">= 1"]),
    "azure_negative": ("azure", AZ + f"{T0},5,1\n{T1},-3,1\n", 3, ["ContextTokens", "-3"]),
    "azure_fraction": ("azure", AZ + f"{T0},5,1\n{T1},12.5,1\n", 3, ["ContextTokens", "12.5", "integer"]),
    "azure_text": ("azure", AZ + f"{T0},5,1\n{T1},abc,1\n", 3, ["ContextTokens", "abc", "integer"]),
    "azure_empty_tokens": ("azure", AZ + f"{T0},5,1\n{T1},5,\n", 3, ["GeneratedTokens", "empty cell"]),
    "csv_nan_arrival": ("csv", PLAIN + "0,1,1\nnan,1,1\n", 3, ["arrival_s"]),
    "csv_text_arrival": ("csv", PLAIN + "0,1,1\nsoon,1,1\n", 3, ["arrival_s", "soon"]),
    "csv_inf_arrival": ("csv", PLAIN + "0,1,1\ninf,1,1\n", 3, ["arrival_s"]),
    "csv_backwards": ("csv", PLAIN + "0,1,1\n5,1,1\n4.5,1,1\n", 4, ["arrival_s", "backwards"]),
    "csv_blank_line_inside": ("csv", PLAIN + "0,1,1\n\n1,1,1\n", 3, ["blank line"]),
    "burst_negative_response": ("burstgpt", BURST_HEADER + "1,M,5,-1,4,x\n", 2, ["Response tokens", ">= 0"]),
    "burst_zero_prompt_kept_row": ("burstgpt", BURST_HEADER + "1,M,5,2,7,x\n2,M,0,2,2,x\n", 3, ["Request tokens", ">= 1"]),
    "burst_backwards": ("burstgpt", BURST_HEADER + "3,M,5,2,7,x\n2,M,5,0,5,x\n", 3, ["Timestamp", "backwards"]),
    "mooncake_bad_json": ("mooncake", '{"timestamp": 0, "input_length": 1, "output_length": 1}\n{"timestamp": 1,\n', 2, ["invalid JSON"]),
    "mooncake_missing_key": ("mooncake", '{"timestamp": 0, "input_length": 1, "output_length": 1}\n{"timestamp": 1, "input_length": 1}\n', 2, ["output_length", "missing"]),
    "mooncake_fraction": ("mooncake", '{"timestamp": 0, "input_length": 1.5, "output_length": 1}\n', 1, ["input_length", "1.5"]),
    "mooncake_zero_output": ("mooncake", '{"timestamp": 0, "input_length": 1, "output_length": 0}\n', 1, ["output_length", ">= 1"]),
    "mooncake_text_timestamp": ("mooncake", '{"timestamp": "noon", "input_length": 1, "output_length": 1}\n', 1, ["timestamp", "noon"]),
    "mooncake_backwards": ("mooncake", '{"timestamp": 9, "input_length": 1, "output_length": 1}\n'
                           '{"timestamp": 8, "input_length": 1, "output_length": 1}\n', 2, ["timestamp", "backwards"]),
}


@pytest.mark.parametrize("name", sorted(BAD))
@pytest.mark.parametrize("chunksize", [1, 65536])
def test_bad_input_names_file_line_and_column(tmp_path, name, chunksize):
    fmt, text, line, words = BAD[name]
    path = write(tmp_path, f"{name}.{'jsonl' if fmt == 'mooncake' else 'csv'}", text)
    with pytest.raises(TraceError) as err:
        load(path, fmt, chunksize)
    message = str(err.value)
    assert path.name in message and f"line {line}," in message, message
    for word in words:
        assert word in message, message


def test_backwards_across_a_chunk_boundary(tmp_path):
    rows = "".join(f"{t},1,1\n" for t in [0, 1, 2, 3, 4, 5, 6, 5.5, 8])
    path = write(tmp_path, "boundary.csv", PLAIN + rows)
    for chunksize in (7, 8):                     # the bad row (line 9) starts a chunk / ends one
        with pytest.raises(TraceError, match=r"boundary\.csv: line 9, .*backwards.*on line 8"):
            load(path, "csv", chunksize)


@pytest.mark.parametrize("fmt", ["azure", "burstgpt", "csv"])
def test_missing_column_names_missing_and_found(tmp_path, fmt):
    path = write(tmp_path, "cols.csv", "arrival,prompt_tokens\n1,2\n")
    with pytest.raises(TraceError, match=r"cols\.csv: line 1 .*missing column.*found columns \['arrival', 'prompt_tokens'\]"):
        read_trace(path, fmt)


@pytest.mark.parametrize("fmt,text", [("azure", AZ), ("csv", PLAIN), ("burstgpt", BURST_HEADER), ("mooncake", ""), ("csv", "")])
def test_empty_trace_is_an_error(tmp_path, fmt, text):
    path = write(tmp_path, f"empty.{fmt}", text)
    with pytest.raises(TraceError, match=r"empty\." + fmt):
        load(path, fmt)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(TraceError, match=r"nowhere\.csv: trace file not found"):
        read_trace(tmp_path / "nowhere.csv", "azure")
    with pytest.raises(ConfigError, match="unknown trace format 'parquet'"):
        read_trace(CONV, "parquet")


def test_ragged_csv_row_is_a_trace_error(tmp_path):
    path = write(tmp_path, "ragged.csv", PLAIN + "0,1,1\n1,1,1,9,9\n")
    with pytest.raises(TraceError, match=r"ragged\.csv"):
        load(path, "csv")
