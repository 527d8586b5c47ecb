"""chat.py: a conversation held in the KV cache, checked against fresh prefills of the whole
conversation; overflow, the terminal (a real pseudo-terminal), piped input and torchrun."""

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest
import torch

import chat
import llama_models
from helpers import REPO, checkpoint, default_sigint
from llama_models.report import Stats

MESSAGES = ["Hi!", "Name a colour.", "And a fruit of that colour?"]


def record_calls(model) -> list:
    """Every forward pass of `model`, as (start_pos, tokens fed, last position's logits)."""
    calls = []

    def hook(module, args, kwargs, logits):
        tokens, start_pos = (*args, kwargs.get("start_pos"))[:2]
        calls.append((int(start_pos), tokens[0].tolist(), logits[0, -1].clone()))

    model.register_forward_hook(hook, with_kwargs=True)
    return calls


def talk(model, tokenizer, conversation, text, max_new_tokens):
    turn = conversation.next_turn(text)
    assert conversation.max_new_tokens == max_new_tokens
    chat.respond(model, tokenizer, conversation, turn, {}, Stats(0.0, len(turn.tokens)))  # greedy
    return turn


def assert_calls_match_a_fresh_prefill(calls, tokens, model_dir, max_seq_len):
    """Each recorded pass's logits equal those of one prefill of `tokens` from position 0, in a
    model that never saw anything else (float32: max abs diff <= 1e-5)."""
    fresh, _ = llama_models.load(model_dir, device="cpu", dtype=torch.float32, max_seq_len=max_seq_len)
    with torch.inference_mode():
        expected = fresh(torch.tensor([tokens]), 0)[0]  # (S, V)
    for start_pos, fed, logits in calls:
        assert fed == tokens[start_pos:start_pos + len(fed)]
        assert (logits - expected[start_pos + len(fed) - 1]).abs().max().item() <= 1e-5


def test_each_turn_feeds_only_its_new_tokens_and_equals_a_fresh_prefill(tmp_path, capsys):
    model_dir = checkpoint(tmp_path, seed=11)
    model, tokenizer = llama_models.load(model_dir, device="cpu", dtype=torch.float32, max_seq_len=256)
    conversation = chat.Conversation(llama_models.ChatFormat(tokenizer), "Be brief.", 256, 8)
    calls = record_calls(model)
    for i, text in enumerate(MESSAGES):
        before, first_call = len(conversation.tokens), len(calls)
        turn = talk(model, tokenizer, conversation, text, 8)
        turn_calls = calls[first_call:]
        # The turn starts where the last one ended and feeds each new position once: its message,
        # the reply header, and the reply's tokens (the previous reply's end-of-turn token first).
        assert turn.start_pos == turn_calls[0][0] == before
        assert sum(len(fed) for _, fed, _ in turn_calls) == len(conversation.tokens) - before
        if i:
            assert turn.tokens[0] == tokenizer.special_tokens["<|eot_id|>"]
    assert len(conversation.messages) == 1 + 2 * len(MESSAGES)
    assert conversation.tokens[:len(conversation.chat_format.encode_dialog_prompt(conversation.messages[:2]))] == \
        conversation.chat_format.encode_dialog_prompt(conversation.messages[:2])
    assert_calls_match_a_fresh_prefill(calls, conversation.tokens, model_dir, 256)


def test_a_cut_reply_stays_and_its_last_token_is_fed_again(tmp_path, monkeypatch):
    model_dir = checkpoint(tmp_path, seed=12)
    model, tokenizer = llama_models.load(model_dir, device="cpu", dtype=torch.float32, max_seq_len=128)
    conversation = chat.Conversation(llama_models.ChatFormat(tokenizer), "", 128, 8)
    calls = record_calls(model)
    real_decode_step = model.decode_step

    def ctrl_c_on_the_fourth_step(tokens, start_pos):
        if start_pos == len(conversation.tokens) + len(turn.tokens) + 3:
            raise KeyboardInterrupt  # as if Ctrl-C came while this token went in
        return real_decode_step(tokens, start_pos)

    turn = conversation.next_turn(MESSAGES[0])
    monkeypatch.setattr(model, "decode_step", ctrl_c_on_the_fourth_step)
    chat.respond(model, tokenizer, conversation, turn, {}, Stats(0.0, len(turn.tokens)))  # greedy
    monkeypatch.undo()
    assert conversation.messages[-1]["role"] == "assistant" and len(conversation.tokens) == len(turn.tokens) + 4
    assert conversation.cached == len(conversation.tokens) - 1
    talk(model, tokenizer, conversation, MESSAGES[1], 8)
    assert_calls_match_a_fresh_prefill(calls, conversation.tokens, model_dir, 128)


def test_overflow_drops_the_oldest_exchanges_keeps_the_system_prompt(tmp_path):
    model_dir = checkpoint(tmp_path, seed=13)
    model, tokenizer = llama_models.load(model_dir, device="cpu", dtype=torch.float32, max_seq_len=160)
    chat_format = llama_models.ChatFormat(tokenizer)
    conversation = chat.Conversation(chat_format, "Be brief.", 160, 8)
    system = conversation.messages[0]
    for text in MESSAGES * 3:
        kept = list(conversation.messages)
        calls = record_calls(model)
        turn = talk(model, tokenizer, conversation, text, 8)
        if turn.start_pos == 0 and len(kept) > 1:
            break
    else:
        pytest.fail("the conversation never outgrew --max-seq-len")
    # Dropped from the front, whole exchanges: the system prompt, then the newest ones.
    dropped = len(kept) + 1 - len(turn.messages)
    assert dropped >= 2 and dropped % 2 == 0
    assert turn.messages == [system] + kept[1 + dropped:] + [{"role": "user", "content": text}]
    assert len(chat_format.encode_dialog_prompt(kept + [turn.messages[-1]])) > 160 - 8  # it had to drop
    # The reply continues a fresh prefill of the kept messages.
    assert conversation.tokens[:len(turn.tokens)] == chat_format.encode_dialog_prompt(turn.messages)
    assert_calls_match_a_fresh_prefill(calls, conversation.tokens, model_dir, 160)

    messages, tokens = list(conversation.messages), list(conversation.tokens)
    with pytest.raises(ValueError, match="does not fit.*the conversation is unchanged"):
        conversation.next_turn("x" * 200)
    assert conversation.messages == messages and conversation.tokens == tokens


def run_main(monkeypatch, capsys, argv, stdin: str):
    """chat.main() in this process, reading `stdin`; (stdout, stderr, the model's forward passes)."""
    calls = []  # one list per model loaded
    real_load = llama_models.load

    def load(*args, **kwargs):
        model, tokenizer = real_load(*args, **kwargs)
        calls.append(record_calls(model))
        return model, tokenizer

    monkeypatch.setattr(llama_models, "load", load)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    chat.main(argv)
    out = capsys.readouterr()
    return out.out, out.err, calls[-1]


def test_piped_input_overflow_notice_and_refusal(tmp_path, monkeypatch, capsys):
    model_dir = checkpoint(tmp_path, seed=14)
    lines = MESSAGES * 2 + ["x" * 300, "/save " + str(tmp_path / "saved.json")]
    out, err, calls = run_main(monkeypatch, capsys, ["--model-dir", str(model_dir), "--max-seq-len", "160",
                                                     "--max-new-tokens", "8", "--system", "Be brief."],
                               "\n".join(lines) + "\n")
    assert re.search(r"\[the conversation outgrew --max-seq-len 160: dropped the \d+ oldest messages "
                     r"\(the system prompt stays\); \d+ positions used, \d+ left for the reply\]", err)
    assert "[this message does not fit" in err and "(the conversation is unchanged)]" in err
    saved = json.loads((tmp_path / "saved.json").read_text())
    assert saved[0] == {"role": "system", "content": "Be brief."} and saved[-2]["content"] == MESSAGES[-1]
    assert [m["content"] for m in saved[2::2]] == [m for m in out.split("\n\n") if m][-len(saved[2::2]):]


def test_piped_input_three_turns_on_smollm2(smollm2_dir, tmp_path, monkeypatch, capsys):
    questions = ["Name a colour.", "Name a fruit.", "Name an animal."]
    out, err, calls = run_main(monkeypatch, capsys, ["--model-dir", str(smollm2_dir), "--max-new-tokens", "40"],
                               "\n".join(questions + ["/save " + str(tmp_path / "three.json")]) + "\n")
    saved = json.loads((tmp_path / "three.json").read_text())
    assert [m["role"] for m in saved] == ["user", "assistant"] * 3
    assert [m["content"] for m in saved[::2]] == questions
    replies = [m["content"] for m in saved[1::2]]
    assert all(replies) and out.index(replies[0]) < out.index(replies[1]) < out.index(replies[2])
    # Each turn's prefill starts where the conversation so far ends: the model saw the earlier
    # exchanges, and read each position once.
    prefills = [i for i, (_, fed, _) in enumerate(calls) if len(fed) > 1]
    assert len(prefills) == 3
    fed_before = [sum(len(fed) for _, fed, _ in calls[:i]) for i in prefills]
    assert [calls[i][0] for i in prefills] == fed_before and fed_before[2] > fed_before[1] > 0
    assert "SmolLM2-135M-Instruct on cpu, bfloat16, context 2048 tokens" in err


def test_same_replies_on_two_processes(tmp_path):
    model_dir = checkpoint(tmp_path, seed=15)  # 4 heads, 2 kv heads: splits over 2 processes
    stdin = "\n".join(MESSAGES) + "\n"
    for decoding in (["--decoding", "greedy"], ["--decoding", "sample", "--temperature", "1.0", "--seed", "3"]):
        command = ["chat.py", "--model-dir", str(model_dir), "--dtype", "float32", "--max-new-tokens", "10",
                   *decoding]
        one = subprocess.run([sys.executable, *command], input=stdin, capture_output=True, text=True, cwd=REPO,
                             timeout=300)
        two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              *command], input=stdin, capture_output=True, text=True, cwd=REPO, timeout=300)
        assert one.returncode == two.returncode == 0, two.stderr[-3000:]
        assert one.stdout.count("\n\n") == len(MESSAGES) and two.stdout == one.stdout


class Terminal:
    """chat.py in a real pseudo-terminal: what a user sees, keystroke by keystroke."""

    def __init__(self, *args, make=None):
        """chat.py ARGS, or with make="VAR=value", `make chat VAR=value`."""
        command = ["make", "chat", make] if make else [sys.executable, "chat.py", *args]
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the terminal is its stdin, stdout and stderr
            default_sigint()
            os.chdir(REPO)
            os.execvp(command[0], command)
        self.seen = ""

    def expect(self, pattern, timeout=120) -> str:
        """Wait for `pattern` in the output since the last expect(); return that output."""
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.seen)):
            assert time.monotonic() < deadline, f"waited for {pattern!r}, saw:\n{self.seen[-2000:]}"
            if select.select([self.fd], [], [], 1)[0]:
                try:
                    self.seen += os.read(self.fd, 4096).decode("utf-8", "replace").replace("\r\n", "\n")
                except OSError:  # the child exited
                    break
        assert match, f"{pattern!r} not in:\n{self.seen[-2000:]}"
        before, self.seen = self.seen[:match.end()], self.seen[match.end():]
        return before

    def send(self, keys: str):
        # At a person's pace: keys that arrive while readline is still setting up the terminal
        # for a new prompt (tcsetattr) can be lost, a Ctrl-C among them.
        time.sleep(0.3)
        os.write(self.fd, keys.encode())

    def exit_status(self) -> int:
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)


def test_terminal_session_on_smollm2(smollm2_dir, tmp_path):
    saved, again = tmp_path / "conversation.json", tmp_path / "again.json"
    term = Terminal("--model-dir", str(smollm2_dir), "--max-new-tokens", "60")
    assert "SmolLM2-135M-Instruct on cpu" in term.expect(r"Ctrl-D to leave\n>>> ")
    term.send("Name a colour.\r")
    first = term.expect(r"\n\n>>> ")
    term.send("And a fruit of that colour?\r")
    term.expect(r"\n\n>>> ")
    term.send("/stats\r")
    stats = term.expect(r"\n>>> ")
    assert re.search(r"decode: [0-9.]+ tok/s", stats) and re.search(r"context: \d+ of 2048 positions used", stats)
    assert re.search(r"the last message fed \d+ new tokens at positions [1-9]\d*\.\.", stats)
    # Ctrl-C in the middle of a long reply: back at the prompt, the partial reply kept.
    term.send("Write a long story about a dragon who learns to read.\r")
    term.expect(r"learns to read\.\n")  # the terminal's echo of the line
    term.expect(r"\S+ \S+ \S+ \S+ \S+ ")  # a few words into the reply
    term.send("\x03")
    term.expect(r" \[cut\]\n\n>>> ")
    term.send("\x03")  # at an empty prompt: how to leave
    term.expect(r"to leave: /bye or Ctrl-D\]\n>>> ")
    term.send(f"/save {saved}\r")
    term.expect(r"\[saved 6 messages to .*\]\n>>> ")
    term.send('"""Say\rhello."""\r')  # a message over two lines
    term.expect(r"\.\.\. ")
    term.expect(r"\n>>> ")
    term.send(f"/save {tmp_path / 'four.json'}\r")
    term.expect(r"\[saved 8 messages")
    term.send("\x04")  # Ctrl-D
    assert term.exit_status() == 0
    assert json.loads((tmp_path / "four.json").read_text())[6] == {"role": "user", "content": "Say\nhello."}
    messages = json.loads(saved.read_text())
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    assert messages[1]["content"] in first and messages[4]["content"].startswith("Write a long story")
    assert messages[5]["content"]  # the cut reply, as far as it got

    term = Terminal("--model-dir", str(smollm2_dir))
    term.expect(r">>> ")
    term.send(f"/load {saved}\r")
    term.expect(r"\[loaded 6 messages from .*\]\n>>> ")
    term.send(f"/save {again}\r/bye\r")
    term.expect(r"\[saved 6 messages")
    assert term.exit_status() == 0
    assert json.loads(again.read_text()) == messages


def test_bad_commands_and_files_are_one_line(tmp_path, monkeypatch, capsys):
    model_dir = checkpoint(tmp_path, seed=16)
    (tmp_path / "bad.json").write_text('[{"role": "wizard", "content": "hi"}]')
    lines = ["/frobnicate", "/load", f"/load {tmp_path / 'missing.json'}", f"/load {tmp_path / 'bad.json'}",
             "/save /nonexistent-dir/x.json", "/system", "/system Be brief.", "/system", "/help", "/reset"]
    out, err, _ = run_main(monkeypatch, capsys, ["--model-dir", str(model_dir)], "\n".join(lines) + "\n")
    assert "[unknown command /frobnicate: /help lists them" in err
    assert "[/load needs a file name: /load FILE]" in err
    assert "[cannot load" in err and "No such file or directory" in err and "role must be one of" in err
    assert "[cannot save to /nonexistent-dir/x.json" in err
    assert "[no system prompt]" in err and "[system prompt: 'Be brief.']" in err
    assert "/save FILE" in err and "[a new conversation]" in err
    assert "Traceback" not in err and out == ""


def test_a_model_without_a_chat_format_is_one_line(tmp_path):
    model_dir = checkpoint(tmp_path, seed=17)
    config = llama_models.tokenizer._llama3_config(256)  # the tiny vocabulary's, but without a chat template
    (model_dir / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_format=None)))
    result = subprocess.run([sys.executable, "chat.py", "--model-dir", str(model_dir)], input="hi\n",
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_a_line_that_begins_with_a_space_is_a_message_even_with_a_slash(tmp_path, monkeypatch, capsys):
    model_dir = checkpoint(tmp_path, seed=15)
    out, err, calls = run_main(monkeypatch, capsys, ["--model-dir", str(model_dir), "--max-new-tokens", "4",
                                                     "--system", "Be brief."],
                               " /foo is a path, what is it?\n/stats\n/reset\n/stats\n")
    assert "unknown command" not in err
    saved_prompt = [fed for _, fed, _ in calls if len(fed) > 1][0]
    assert "/foo is a path, what is it?" in llama_models.Tokenizer(model_dir / "tokenizer.model").decode(saved_prompt)
    # /stats counts in words: after the reply 3 messages, after /reset the system prompt alone.
    assert "(3 messages;" in err and "(1 message;" in err


def test_a_refused_piped_message_is_a_message_all_the_same(tmp_path, monkeypatch, capsys):
    model_dir = checkpoint(tmp_path, seed=16)
    out, err, _ = run_main(monkeypatch, capsys, ["--model-dir", str(model_dir), "--max-seq-len", "64",
                                                 "--max-new-tokens", "8"], "x" * 300 + "\n")
    assert "[this message does not fit" in err and "held no message" not in err
    out, err, _ = run_main(monkeypatch, capsys, ["--model-dir", str(model_dir)], "\n/stats\n")
    assert "[standard input held no message: nothing to answer]" in err


def test_make_chat_exits_as_chat_py_does_after_ctrl_c(smollm2_dir):
    """make receives the terminal's Ctrl-C too: it must not turn chat.py's 0 into its own 130."""
    term = Terminal(make="SMOLLM2_DIR=" + str(smollm2_dir))
    term.expect(r">>> ")
    term.send("\x03")  # Ctrl-C at the prompt: chat.py says how to leave, and goes on
    term.expect(r"to leave: /bye or Ctrl-D\]\n>>> ")
    term.send("/bye\n")
    assert term.exit_status() == 0
