"""serve.py: the real openai client against servers started here, on 127.0.0.1. Answers equal
the library's single-stream decoding (and run_inference.py's), alone or in a batch; bad input is
refused with OpenAI's error object while other requests go on; a client that leaves frees its row;
the command line (one-line errors, the API key, Ctrl-C)."""

import contextlib
import http.client
import json
import re
import signal
import socket
import threading
import time

import openai
import pytest
import torch

import llama_models
import serve
from helpers import CYCLE_TEXT, checkpoint, cycle_checkpoint, finish, run_script, sharpened, start_script
from llama_models import generation
from llama_models.batching import Batch

SAMPLING = dict(temperature=0.6, top_p=0.9, top_k=0)  # what requests that give none get (the flags' defaults)


@contextlib.contextmanager
def running(model, tokenizer, name: str, *, queue_size: int = 8, max_request_bytes: int = 100_000):
    """serve.py's server on `model` (its max_batch_size rows), in this process, on a free port:
    the model thread and the HTTP thread, as main() starts them. Yields (server, base url, the
    shapes of the decode steps the model saw, the log)."""
    steps, lines = [], []
    model.register_forward_pre_hook(lambda module, args: steps.append(tuple(args[0].shape)) if args[0].shape[1] == 1
                                    else None)
    server = serve.Server(("127.0.0.1", 0), model, tokenizer, name, slots=model.params.max_batch_size,
                          queue_size=queue_size, api_key=None, max_request_bytes=max_request_bytes, sampling=SAMPLING,
                          log=lines.append)
    model_thread = threading.Thread(target=serve.decode_forever, daemon=True,
                                    args=(server.batch, server.waiting, server.stopping, lines.append))
    model_thread.start()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}/v1", steps, lines
    finally:
        server.shutdown()
        server.stopping.set()
        model_thread.join()
        server.server_close()


def client(url: str, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120, **options)


def alone(model, tokenizer, prompt: list[int], max_tokens: int, sampling=None) -> tuple[str, int, list]:
    """What a request gets alone, from the library's single-stream decoding: (its text, its
    tokens with the stop token, the log-softmax of each step's logits)."""
    steps = []
    options = dict(max_new_tokens=max_tokens, stop_tokens=tokenizer.stop_tokens,
                   on_token=lambda logits, token: steps.append(logits.log_softmax(-1)))
    if sampling:
        tokens = list(generation.sample(model, prompt, **sampling, **options))
    else:
        tokens = list(generation.greedy(model, prompt, **options))
    text = generation.TextStream(tokenizer)
    return "".join(map(text.add, tokens)) + text.end(), len(tokens), steps


def streamed(stream) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of a streamed chat completion with include_usage."""
    text, finish_reason, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish_reason = chunk.choices[0].finish_reason or finish_reason
        usage = chunk.usage or usage
    return "".join(text), finish_reason, usage.completion_tokens


def no_stop_tokens(model_dir):
    """Zero the output rows of the stop tokens, for texts that must run to max_tokens: with
    sharpened weights some other logit is always well above 0."""
    path = model_dir / "consolidated.00.pth"
    state_dict = torch.load(path, weights_only=True)
    tokenizer = llama_models.Tokenizer(model_dir / "tokenizer.model")
    state_dict["output.weight"][tokenizer.stop_tokens] = 0
    torch.save(state_dict, path)
    return model_dir


def load(model_dir, slots=1, max_seq_len=2048):
    return llama_models.load(model_dir, device="cpu", dtype=torch.float32, max_seq_len=max_seq_len,
                             max_batch_size=slots)


# --- the model's batched step ------------------------------------------------------------------

def test_rows_at_their_own_positions_equal_a_fresh_prefill(tmp_path):
    """Batch.join, step and leave against a fresh prefill of each row's whole text, from position
    0, in a model that saw nothing else (float32)."""
    model_dir = sharpened(checkpoint(tmp_path, seed=21), names=("output.weight", "wq.weight", "wk.weight"))
    model, _ = load(model_dir, slots=3)
    reference, _ = load(model_dir)

    def fresh(tokens):
        return reference(torch.tensor([tokens]), 0)[0, -1]  # (V,)

    texts = {0: [5, 6, 7, 8, 9, 10, 11], 1: [40, 41, 42], 2: [100, 101, 102, 103, 104]}  # owner: tokens fed
    batch = Batch(model)
    with torch.inference_mode():
        for owner, prompt in texts.items():  # each prompt into its own row, beside the others
            assert torch.allclose(batch.join(owner, prompt), fresh(prompt), atol=1e-5)
        chosen = {owner: int(fresh(text).argmax()) for owner, text in texts.items()}
        for step in range(6):
            if step == 2:
                batch.leave(0)  # the last row moves into row 0, at its own position
            logits = batch.step([chosen[owner] for owner in batch.rows])  # rows at 3 different positions
            for owner, row_logits in zip(batch.rows, logits):
                texts[owner].append(chosen[owner])
                assert torch.allclose(row_logits, fresh(texts[owner]), atol=1e-5), (owner, step)
                chosen[owner] = int(row_logits.argmax())
    assert batch.rows == [2, 1] and batch.positions == [len(texts[2]), len(texts[1])]


# --- a real model, alone and in a batch -------------------------------------------------------

MESSAGES = [{"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    model, tokenizer = load(smollm2_dir, slots=4)
    reference, _ = load(smollm2_dir)
    with running(model, tokenizer, "SmolLM2-135M-Instruct") as (server, url, steps, lines):
        yield dict(dir=smollm2_dir, url=url, steps=steps, tokenizer=tokenizer, reference=reference, lines=lines)


def test_chat_completion_whole_and_streamed_equal_run_inference(smollm2):
    api, tokenizer = client(smollm2["url"]), smollm2["tokenizer"]
    whole = api.chat.completions.create(model="SmolLM2-135M-Instruct", messages=MESSAGES, max_tokens=24,
                                        temperature=0, logprobs=True, top_logprobs=3)
    stream = api.chat.completions.create(model="SmolLM2-135M-Instruct", messages=MESSAGES, max_tokens=24,
                                         temperature=0, stream=True, stream_options={"include_usage": True})
    text, finish_reason, completion_tokens = streamed(stream)
    script = run_script("run_inference.py", "--model-dir", smollm2["dir"], "--chat", "--system", MESSAGES[0]["content"],
                        "--prompt", MESSAGES[1]["content"], "--max-new-tokens", 24, "--dtype", "float32")
    assert script.returncode == 0, script.stderr
    answer = whole.choices[0].message.content
    assert answer == text == script.stdout.removesuffix("\n") and "Paris" in answer
    assert whole.choices[0].finish_reason == finish_reason == "stop"

    prompt = llama_models.ChatFormat(tokenizer).encode_dialog_prompt(MESSAGES)
    expected_text, n_tokens, logprobs = alone(smollm2["reference"], tokenizer, prompt, 24)
    assert answer == expected_text
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(prompt), n_tokens) and \
        completion_tokens == n_tokens
    entries = whole.choices[0].logprobs.content
    assert len(entries) == n_tokens - 1  # the stop token is not text
    for entry, step in zip(entries, logprobs):
        top = step.topk(3)
        assert abs(entry.logprob - top.values[0].item()) <= 1e-5  # greedy: the chosen token is the top one
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-5)
        assert [bytes(t.bytes) for t in entry.top_logprobs] == [tokenizer.decode_bytes([int(t)]) for t in top.indices]
    assert "".join(entry.token for entry in entries) == answer


def concurrent_streams(url: str, model_id: str, requests: list, head_start: int = 3) -> list:
    """Stream each request from a thread of its own; each starts once the one before it has
    received `head_start` chunks (staggered, and overlapping while the earlier ones run). Returns
    [(text, finish_reason, completion tokens)] in the order given."""
    api, results, started = client(url), [None] * len(requests), [threading.Event() for _ in requests]

    def run(i, kwargs):
        stream = api.chat.completions.create(model=model_id, stream=True, stream_options={"include_usage": True},
                                             **kwargs)
        text, finish_reason, usage, chunks = [], None, None, 0
        for chunk in stream:
            chunks += 1
            if chunks == head_start:
                started[i].set()
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
                finish_reason = chunk.choices[0].finish_reason or finish_reason
            usage = chunk.usage or usage
        started[i].set()
        results[i] = ("".join(text), finish_reason, usage.completion_tokens)

    threads = [threading.Thread(target=run, args=(i, kwargs)) for i, kwargs in enumerate(requests)]
    for thread, event in zip(threads, started):
        thread.start()
        assert event.wait(timeout=120)
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_four_staggered_requests_get_their_alone_tokens_on_smollm2(smollm2):
    tokenizer, chat_format = smollm2["tokenizer"], llama_models.ChatFormat(smollm2["tokenizer"])
    questions = ["Write a poem about the sea.", "List five fruits and their colours, one per line.",
                 "Hi!", "Explain in three sentences why the sky is blue."]
    requests = [dict(messages=[{"role": "user", "content": q}], max_tokens=n, temperature=0)
                for q, n in zip(questions, [20, 14, 10, 16])]
    del smollm2["steps"][:]
    results = concurrent_streams(smollm2["url"], "SmolLM2-135M-Instruct", requests)
    assert max(rows for rows, _ in smollm2["steps"]) > 1  # at the model's input: several rows in one step
    for kwargs, result in zip(requests, results):
        prompt = chat_format.encode_dialog_prompt(kwargs["messages"])
        text, n_tokens, _ = alone(smollm2["reference"], tokenizer, prompt, kwargs["max_tokens"])
        assert result[0] == text and result[2] == n_tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny model with sharp choices that never writes a stop token, on a 4-row server."""
    model_dir = no_stop_tokens(sharpened(checkpoint(tmp_path_factory.mktemp("tiny"), seed=22),
                                         names=("output.weight", "wq.weight", "wk.weight")))
    model, tokenizer = load(model_dir, slots=4)
    reference, _ = load(model_dir)
    with running(model, tokenizer, "tiny") as (server, url, steps, lines):
        yield dict(url=url, steps=steps, tokenizer=tokenizer, reference=reference, server=server, lines=lines)


def test_four_staggered_requests_get_their_alone_tokens_on_a_random_model(tiny):
    tokenizer, chat_format = tiny["tokenizer"], llama_models.ChatFormat(tiny["tokenizer"])
    requests = [dict(messages=[{"role": "user", "content": "x" * (3 + 17 * i)}], max_tokens=120 - 20 * i,
                     temperature=0) for i in range(4)]
    requests[2] |= dict(temperature=0.9, top_p=0.95, seed=7)  # sampled: the same draws as alone
    del tiny["steps"][:]
    results = concurrent_streams(tiny["url"], "tiny", requests)
    assert max(rows for rows, _ in tiny["steps"]) > 1
    for kwargs, result in zip(requests, results):
        prompt = chat_format.encode_dialog_prompt(kwargs["messages"])
        sampling = dict(temperature=0.9, top_k=0, top_p=0.95, seed=7) if "seed" in kwargs else None
        text, n_tokens, _ = alone(tiny["reference"], tokenizer, prompt, kwargs["max_tokens"], sampling)
        assert result == (text, "length", n_tokens)


# --- bad input, while a stream goes on --------------------------------------------------------

def post(url: str, path: str, body, headers=None) -> tuple[int, dict, dict]:
    """A raw POST (bytes, or JSON of a value): (status, JSON answer, headers)."""
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    return response.status, answer, dict(response.headers)


CHAT = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
BAD = [  # (body, status, param, code): the error object each gets
    (b'{"model": "tiny", "messages": [', 400, None, None),  # malformed JSON
    (b"\xff\xfe not utf-8", 400, None, None),
    ([1, 2], 400, None, None),  # JSON, but not an object
    (CHAT | {"temperature": "hot"}, 400, "temperature", None),
    (CHAT | {"max_tokens": "5"}, 400, "max_tokens", None),
    (CHAT | {"stream": "yes"}, 400, "stream", None),
    (CHAT | {"messages": "Hi"}, 400, "messages", None),
    (CHAT | {"messages": [{"role": "wizard", "content": "Hi"}]}, 400, "messages[0].role", None),
    (CHAT | {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content", None),
    (CHAT | {"model": "gpt-4o"}, 404, "model", "model_not_found"),
    (CHAT | {"n": 2}, 400, "n", None),
    (CHAT | {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", None),
    (CHAT | {"messages": [{"role": "user", "content": "y" * 3000}]}, 400, "messages", "context_length_exceeded"),
    (CHAT | {"max_tokens": -5}, 400, "max_tokens", None),
    (CHAT | {"max_tokens": 10**12}, 400, "max_tokens", "context_length_exceeded"),
    (CHAT | {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    (CHAT | {"logprobs": True, "top_logprobs": 99}, 400, "top_logprobs", None),
    (CHAT | {"messages": [{"role": "user", "content": "z" * 200_000}]}, 413, None, None),  # > max_request_bytes
]


def test_bad_input_gets_its_error_object_while_a_stream_finishes_intact(tiny):
    tokenizer, url = tiny["tokenizer"], tiny["url"]
    request = dict(messages=[{"role": "user", "content": "A long one."}], max_tokens=1500, temperature=0)
    result, ended = [], threading.Event()
    stream_thread = threading.Thread(target=lambda: (result.extend(concurrent_streams(url, "tiny", [request])),
                                                     ended.set()))
    stream_thread.start()
    while not tiny["server"].batch.rows:
        time.sleep(0.01)
    logged = len(tiny["lines"])
    answers = [post(url, "/v1/chat/completions", body) for body, *_ in BAD]
    answers.append(post(url, "/v1/completions", {"model": "tiny", "prompt": "Hi", "echo": True}))
    answers.append(post(url, "/v1/nowhere", {}))
    assert not ended.is_set()  # the stream was still going while every bad request was answered
    expected = [(status, param, code) for _, status, param, code in BAD]
    expected += [(400, "echo", None), (404, None, "unknown_url")]
    for (status, answer, _), (want_status, want_param, want_code) in zip(answers, expected):
        assert status == want_status, answer
        assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
        assert (answer["error"]["param"], answer["error"]["code"]) == (want_param, want_code), answer
    stream_thread.join(timeout=120)
    prompt = llama_models.ChatFormat(tokenizer).encode_dialog_prompt(request["messages"])
    text, n_tokens, _ = alone(tiny["reference"], tokenizer, prompt, 1500)
    assert result == [(text, "length", n_tokens)]
    refusals = [line for line in tiny["lines"][logged:] if re.match(r"POST /v1/\w+(/\w+)?: 4\d\d ", line)]
    assert len(refusals) == len(expected)  # one line each


def test_models_health_and_plain_completions(tiny):
    api = client(tiny["url"])
    assert [m.id for m in api.models.list()] == ["tiny"] and api.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("gpt-4o")
    connection = http.client.HTTPConnection("127.0.0.1", tiny["server"].server_address[1], timeout=60)
    connection.request("GET", "/health")
    health = json.loads(connection.getresponse().read())
    assert health["status"] == "ok" and health["slots"] == 4
    tokenizer = tiny["tokenizer"]
    completion = api.completions.create(model="tiny", prompt="Once upon", max_tokens=12, temperature=0, logprobs=2)
    prompt = tokenizer.encode("Once upon", bos=True, eos=False)
    text, n_tokens, logprobs = alone(tiny["reference"], tokenizer, prompt, 12)
    assert completion.choices[0].text == text and completion.usage.completion_tokens == n_tokens == 12
    assert completion.choices[0].logprobs.token_logprobs == pytest.approx([s.max().item() for s in logprobs], abs=1e-5)


def test_what_http_server_refuses_itself_is_an_error_object_too(tiny):
    port = tiny["server"].server_address[1]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("PUT", "/v1/models")
    response = connection.getresponse()
    assert response.status == 501 and json.loads(response.read())["error"]["message"]
    with socket.create_connection(("127.0.0.1", port), timeout=60) as raw:
        raw.sendall(b"NONSENSE\r\n\r\n")  # not even a request line: HTTP/0.9, a body alone
        assert json.loads(raw.makefile("rb").read())["error"]["message"].startswith("Bad request syntax")


# --- a client that leaves, a full queue ---------------------------------------------------------

def test_a_client_that_leaves_frees_its_row_for_a_waiting_request(tmp_path):
    model, tokenizer = load(no_stop_tokens(sharpened(checkpoint(tmp_path, seed=23))), slots=1, max_seq_len=8192)
    with running(model, tokenizer, "tiny", queue_size=1) as (server, url, steps, lines):
        api = client(url)
        first = api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Go on."}],
                                            max_tokens=8000, temperature=0, stream=True)
        next(iter(first))
        while not server.batch.rows:  # it holds the one row
            time.sleep(0.01)
        waiting = []
        thread = threading.Thread(target=lambda: waiting.append(api.chat.completions.create(**CHAT)))
        thread.start()
        while server.waiting.qsize() == 0:
            time.sleep(0.01)
        status, answer, headers = post(url, "/v1/chat/completions", CHAT)  # one row, one place in the queue: full
        assert status == 429 and answer["error"]["code"] == "rate_limit_exceeded" and headers["Retry-After"] == "1"
        first.close()  # the client goes away mid-stream
        thread.join(timeout=60)
        assert waiting and waiting[0].usage.completion_tokens == 5
        assert any(re.search(r"request \d+ leaves row 0 \(its client went away\) after \d+ tokens", line)
                   for line in lines)


# --- the command line ---------------------------------------------------------------------------

def banner_port(process) -> int:
    """Read serve.py's stderr up to its banner; the port it says it listens on."""
    for line in process.stderr:
        match = re.search(r"at http://127\.0\.0\.1:(\d+)/v1", line)
        if match:
            return int(match.group(1))
    raise AssertionError(f"no banner; exit status {process.wait()}")


def test_key_stop_strings_and_ctrl_c_on_the_command_line(tmp_path):
    process = start_script("serve.py", "--model-dir", cycle_checkpoint(tmp_path), "--port", 0, "--api-key", "sesame",
                           "--threads", 1)
    try:
        url = f"http://127.0.0.1:{banner_port(process)}/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        api = openai.OpenAI(base_url=url, api_key="sesame", max_retries=0)
        model_id = api.models.list().data[0].id  # the checkpoint folder's name
        # The cycle model writes CYCLE_TEXT for ever, "🦙 世界!🦙 世界!...": cut before the stop string.
        answer = api.completions.create(model=model_id, prompt=CYCLE_TEXT[-1], max_tokens=50, temperature=0,
                                        stop=["界"])
        assert (answer.choices[0].text, answer.choices[0].finish_reason) == ("🦙 世", "stop")
        stream = api.completions.create(model=model_id, prompt=CYCLE_TEXT[-1], max_tokens=50, temperature=0,
                                        stop="界!", stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream) == "🦙 世"
        stream = api.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "!"}],
                                             max_tokens=2000, temperature=0, stream=True)
        next(iter(stream))
        process.send_signal(signal.SIGINT)  # Ctrl-C, mid-stream: the stream is told why it ends
        with pytest.raises(openai.APIError, match="the server stopped"):
            for _ in stream:
                pass
        status, _, err = finish(process, timeout=60)
    finally:
        process.kill()
    assert status == 130 and err.rstrip().endswith("[interrupted]") and "Traceback" not in err


@pytest.mark.parametrize("flags, message", [
    (["--slots", "0"], "error: --slots must be at least 1, got 0"),
    (["--port", "99999"], "error: cannot listen on 127.0.0.1:99999"),
    (["--host", "256.1.1.1"], "error: cannot listen on 256.1.1.1"),
])
def test_bad_flags_are_one_line(tmp_path, flags, message):
    result = run_script("serve.py", "--model-dir", checkpoint(tmp_path), "--threads", 1, *flags)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr
