"""The model behind an OpenAI-compatible API, and how one model serves several people at once.

Editors, notebooks, chat front-ends and the `openai` client all speak OpenAI's HTTP API; this
server answers it: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health.

To decode one token the model reads every weight; a step that feeds one token to each of 4
conversations reads them once too, and costs little more than a step for 1. So the server
decodes its conversations together: continuous batching. One thread owns the model and runs
decode_forever() below; each HTTP connection has a thread of its own, which checks a request,
hands it to the model thread, and writes back the tokens that come. The KV cache has SLOTS rows
(llama_models/batching.py draws them), each a conversation at its own position. Each step:

  1. the requests whose client went away leave their rows;
  2. waiting requests join the free rows: each prompt is prefilled alone into its row, and its
     last logits choose the request's first token;
  3. one decode step for all busy rows together, each row's token at that row's own position;
  4. each request takes its token (its text, stop strings, logprobs) to its handler; a request
     that is done leaves its row, and a waiting one may take it at the next step.

Three requests and SLOTS = 2: A asks for 10 tokens, B for 12, C for 6. P: the request's prefill,
between two steps, which chooses its first token; =: a step gives it a token; |: its last;
.: it waits for a row.

    step            1  2  3  4  5  6  7  8  9 10 11 12 13 14
    A  10 tokens  P==========================|                      row 0
    B  12 tokens     P================================|             row 1, then row 0
    C   6 tokens          .  .  .  .  .  .  .P==============|       row 1, then row 0
    busy rows       1  2  2  2  2  2  2  2  2  2  2  2  1  1

A leaves after step 9; B, in the last busy row, moves into A's row 0 (llama_models/batching.py
says why), and C, which came during step 3 and found no free row, joins row 1 before step 10.

A request's tokens are the ones it would get alone: its prompt is prefilled alone, and in a
step each row attends to its own cache row up to its own position. Sampling draws with the
request's own seeded generator. docs/serve.md has a real timeline, read from the log.

Edit the globals below and run it, or override them with flags:
    .venv/bin/python serve.py --model-dir ~/.llama/checkpoints/SmolLM2-135M-Instruct
    .venv/bin/python serve.py --slots 8 --quantize int8 --port 8080
    .venv/bin/python serve.py --host 0.0.0.0 --api-key "$(cat ~/.llama/api-key)"
then, from another terminal:
    curl http://127.0.0.1:8000/v1/chat/completions -H "Content-Type: application/json" \\
         -d '{"messages": [{"role": "user", "content": "What is the capital of France?"}]}'
Ctrl-C lets the open requests' current step finish, tells their clients the server stopped,
and exits.
"""

import contextlib
import hmac
import itertools
import json
import queue
import secrets
import select
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, NamedTuple, Optional

import torch

import llama_models
from llama_models import cli, generation
from llama_models.batching import Batch
from llama_models.chat_format import ROLES
from llama_models.report import model_summary

# --- the server (the model, the device and the rest: llama_models/cli.py, or --help) ---
HOST = "127.0.0.1"  # only this machine may connect; "0.0.0.0" opens the server to the network
PORT = 8000  # 0: any free port (the banner says which)
API_KEY = None  # a secret every request must carry as "Authorization: Bearer KEY"; None: no key
# Rows of the KV cache: the conversations decoded together. Each row holds --max-seq-len
# positions (memory: model_summary prints it); more rows give more tokens/s in all, up to where
# a step stops being bound by reading the weights.
SLOTS = 4
QUEUE = 16  # requests that may wait for a free row; one more is refused: 429, try again later
RETRY_AFTER_S = 1  # what a 429 asks the client to wait (the openai client waits, then retries)
MAX_REQUEST_BYTES = 1_000_000  # a larger request body is refused (413), never held in memory
CLIENT_POLL_S = 0.25  # how often a handler waiting for tokens checks that its client is still there


# ---------------------------------------------------------------------------------------------
# A request, between its handler and the model thread.
# ---------------------------------------------------------------------------------------------

class Options(NamedTuple):
    """What a request asks for, checked (parse_options)."""
    max_tokens: int  # the most tokens to write, a stop token included
    choose: Callable[[torch.Tensor], int]  # (V,) logits -> token id: generation.argmax, or a seeded sampler()
    stop: list  # strings that end the text (not included in it)
    logprobs: Optional[int]  # None: no logprobs; n: each token's logprob and the n most likely
    stream: bool  # server-sent events, a chunk per step, or one JSON answer at the end
    include_usage: bool  # stream: a last chunk with the token counts


class Piece(NamedTuple):
    """Model thread -> handler: text that can go out now ("" while held back), and the logprobs
    entries of the tokens it came from."""
    text: str
    logprobs: list


class Done(NamedTuple):
    """Model thread -> handler: the request is finished."""
    finish_reason: str  # "stop": a stop token or stop string; "length": max_tokens
    completion_tokens: int


class Failed(NamedTuple):
    """Model thread -> handler: the request ends without its answer."""
    status: int
    message: str


class Request:
    """One completion: its prompt and options, the state of its text, and the two ways between
    its handler and the model thread: `events` (tokens out) and `gone` (the client left)."""

    numbers = itertools.count(1)

    def __init__(self, tokenizer, prompt: list[int], options: Options, chat: bool):
        self.number = next(Request.numbers)  # what the log calls it
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"  # what the client sees
        self.created = int(time.time())
        self.tokenizer, self.prompt, self.options, self.chat = tokenizer, prompt, options, chat
        self.tokens: list[int] = []  # written so far
        self.text = generation.TextStream(tokenizer)
        self.held = ""  # text not sent yet: it might be the beginning of a stop string
        self.events = queue.Queue()  # Piece ..., then Done or Failed
        self.gone = threading.Event()  # set by the handler: nobody reads the events any more
        self.answered = threading.Event()  # set by the handler: its last byte is written
        self.arrived_at, self.joined_at = time.monotonic(), None  # when it came, when it got a row

    def take(self, token: int, logits: torch.Tensor) -> Optional[str]:
        """The model thread hands over the request's next token and the (V,) logits it was chosen
        from. Its text goes to the handler; returns why the request is done, or None."""
        self.tokens.append(token)
        stop_token = token in self.tokenizer.stop_tokens
        finish = "stop" if stop_token else "length" if len(self.tokens) == self.options.max_tokens else None
        logprobs = [] if stop_token or self.options.logprobs is None else [self.logprob(token, logits)]
        text, stopped = self.release(self.text.add(token) + (self.text.end() if finish else ""), final=bool(finish))
        if text or logprobs:
            self.events.put(Piece(text, logprobs))
        return "stop" if stopped else finish

    def release(self, text: str, final: bool) -> tuple[str, bool]:
        """What of the text so far can go out, and whether a stop string ended it: the text before
        the first stop string; else all of it but a tail that may be a stop string's beginning."""
        held = self.held + text
        cuts = [i for i in (held.find(stop) for stop in self.options.stop) if i >= 0]
        if cuts:
            self.held = ""
            return held[:min(cuts)], True
        # (n up to the held text's length: a long stop string costs no more than the text itself)
        keep = 0 if final else max((n for stop in self.options.stop for n in range(1, min(len(stop), len(held) + 1))
                                    if held.endswith(stop[:n])), default=0)
        self.held = held[len(held) - keep:]
        return held[:len(held) - keep], False

    def logprob(self, token: int, logits: torch.Tensor) -> dict:
        """OpenAI's logprobs entry of a token: its log-probability and the most likely tokens', in
        the model's own distribution (log_softmax of the logits, before temperature or top-p;
        the probabilities run_inference.py --show-top prints)."""
        logprobs = logits.log_softmax(dim=-1)  # (V,) float32
        top = logprobs.topk(self.options.logprobs)

        def entry(t: int, logprob: float) -> dict:
            raw = self.tokenizer.decode_bytes([t])
            return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

        alternatives = [entry(int(t), float(lp)) for lp, t in zip(top.values, top.indices)]
        return dict(entry(token, float(logprobs[token])), top_logprobs=alternatives)


# ---------------------------------------------------------------------------------------------
# The model thread: continuous batching.
# ---------------------------------------------------------------------------------------------

@torch.inference_mode()  # no autograd graph: it would chain every step through the cache
def decode_forever(batch: Batch, waiting: queue.Queue, stopping: threading.Event, log) -> None:
    """Admit, step, hand out, free: until `stopping` is set; then end every open request."""
    step = 0
    while not stopping.is_set():
        for request in [r for r in batch.rows if r.gone.is_set()]:
            leave(batch, request, step, "its client went away", log)
        admit(batch, waiting, step, log, wait=not batch.rows)
        if not batch.rows:
            continue
        step += 1
        try:
            logits = batch.step([request.tokens[-1] for request in batch.rows])  # (busy rows, V)
        except Exception as e:  # a failed step (out of memory, ...) fails its requests, not the server
            for request in list(batch.rows):
                batch.leave(request)
                request.events.put(Failed(500, f"the model failed: {e}"))
            log(f"step {step}: the model failed ({type(e).__name__}: {e}); its requests get a 500")
            continue
        for request, row_logits in zip(list(batch.rows), logits):
            hand_token(batch, request, row_logits, step, log)
    for request in batch.rows + drain(waiting):
        request.events.put(Failed(503, "the server stopped (Ctrl-C) before this answer was finished"))


def admit(batch: Batch, waiting: queue.Queue, step: int, log, wait: bool) -> None:
    """Waiting requests take the free rows, first come first served (wait: block a moment for one)."""
    while batch.free():
        try:
            request = waiting.get(timeout=CLIENT_POLL_S) if wait else waiting.get_nowait()
        except queue.Empty:
            return
        wait = False
        if request.gone.is_set():
            log(f"request {request.number}: its client went away while it waited")
            continue
        request.joined_at = time.monotonic()
        try:
            logits = batch.join(request, request.prompt)  # the prefill, alone, into the next free row
        except Exception as e:
            request.events.put(Failed(500, f"the model failed: {e}"))
            log(f"request {request.number}: the prefill failed ({type(e).__name__}: {e})")
            continue
        log(f"step {step}: request {request.number} joins row {len(batch.rows) - 1} ({len(request.prompt)}-token "
            f"prompt, waited {request.joined_at - request.arrived_at:.2f} s); busy rows: {len(batch.rows)}, "
            f"waiting: {waiting.qsize()}")
        hand_token(batch, request, logits, step, log)


def hand_token(batch: Batch, request: Request, logits: torch.Tensor, step: int, log) -> None:
    """Choose the request's next token from its (V,) logits and hand it over; a request that is
    done leaves its row."""
    position = batch.positions[batch.rows.index(request)]  # where the token will go
    try:
        generation.check_finite(logits, position, batch.model.dtype)
        finish = request.take(request.options.choose(logits), logits)
    except generation.NonFiniteLogits as e:
        request.events.put(Failed(500, str(e)))
        leave(batch, request, step, "its logits are not finite", log)
        return
    if finish:
        request.events.put(Done(finish, len(request.tokens)))
        leave(batch, request, step, f"{finish}", log)


def leave(batch: Batch, request: Request, step: int, why: str, log) -> None:
    row, last = batch.rows.index(request), batch.rows[-1]
    batch.leave(request)
    moved = f"; request {last.number} moves from row {len(batch.rows)} to row {row}" if last is not request else ""
    seconds = time.monotonic() - request.joined_at
    log(f"step {step}: request {request.number} leaves row {row} ({why}) after {len(request.tokens)} tokens "
        f"in {seconds:.2f} s{moved}; busy rows: {len(batch.rows)}")


def drain(waiting: queue.Queue) -> list:
    requests = []
    while not waiting.empty():
        requests.append(waiting.get_nowait())
    return requests


# ---------------------------------------------------------------------------------------------
# The API: OpenAI's request fields in, its JSON objects and server-sent events out.
# ---------------------------------------------------------------------------------------------

class ApiError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}


JSON_TYPES = {"an integer": int, "a number": (int, float), "a string": str, "a boolean": bool,
              "an array": list, "an object": dict}


def option(body: dict, name: str, kind: str, default=None, ok=lambda value: True, must: str = ""):
    """body[name], checked to be of its JSON kind ("an integer", ...) and to pass `ok`; absent or
    null: default."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, JSON_TYPES[kind]) or (isinstance(value, bool) and kind != "a boolean"):
        raise ApiError(400, f"{name} must be {kind}, got {json.dumps(value)[:40]}", param=name)
    if not ok(value):
        raise ApiError(400, f"{name} must be {must}, got {json.dumps(value)[:40]}", param=name)
    return value


# Fields of OpenAI's API for what this server does not do: accepted at the values that ask for
# nothing (what clients send by default), refused otherwise rather than silently ignored.
NOT_DONE = {"n": [1], "best_of": [1], "echo": [False], "suffix": [""], "frequency_penalty": [0],
            "presence_penalty": [0], "logit_bias": [{}], "tools": [[]], "functions": [[]],
            "tool_choice": ["none", "auto"], "function_call": ["none", "auto"], "response_format": [{"type": "text"}],
            "audio": [], "modalities": [["text"]]}


def parse_options(body: dict, server, prompt: list[int], chat: bool) -> Options:
    """The options of a completion request, checked; ApiError for a bad one."""
    for name, neutral in NOT_DONE.items():
        if body.get(name) not in [None, *neutral]:
            accepted = " or ".join(map(json.dumps, neutral)) or "null"
            raise ApiError(400, f"{name}={json.dumps(body[name])[:40]} is not supported by this server "
                           f"(only {accepted})", param=name)
    room = server.max_seq_len - len(prompt)
    if room < 1:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens; this server's context is {server.max_seq_len} "
                       f"tokens (--max-seq-len), prompt and answer together", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"  # the newer wins
    max_tokens = option(body, name, "an integer", room, lambda n: n >= 1, "at least 1")
    if max_tokens > room:
        raise ApiError(400, f"{name} is {max_tokens}, but after the {len(prompt)}-token prompt there is room for "
                       f"{room} in this server's context of {server.max_seq_len} (--max-seq-len)",
                       param=name, code="context_length_exceeded")
    stream = option(body, "stream", "a boolean", False)
    include_usage = option(option(body, "stream_options", "an object", {}), "include_usage", "a boolean", False)
    if chat:
        top = option(body, "top_logprobs", "an integer", 0, lambda n: 0 <= n <= 20, "from 0 to 20")
        logprobs = top if option(body, "logprobs", "a boolean", False) else None
    else:
        logprobs = option(body, "logprobs", "an integer", None, lambda n: 0 <= n <= 5, "from 0 to 5")
    return Options(max_tokens, choice_rule(body, server), stop_strings(body), logprobs, stream, include_usage)


def choice_rule(body: dict, server):
    """How to pick each token: argmax at temperature 0 (or top_p 0), else a draw with the request's
    seed (a random one if it gives none)."""
    temperature = option(body, "temperature", "a number", server.temperature, lambda t: 0 <= t <= 2, "from 0 to 2")
    top_p = option(body, "top_p", "a number", server.top_p, lambda p: 0 <= p <= 1, "from 0 to 1")
    top_k = option(body, "top_k", "an integer", server.top_k, lambda k: k >= 0, "0 (off) or more")
    seed = option(body, "seed", "an integer", None, lambda s: -2**63 <= s < 2**64, "a 64-bit integer")
    if temperature == 0 or top_p == 0:
        return generation.argmax
    seed = secrets.randbits(63) if seed is None else seed
    return generation.sampler(temperature, top_k, top_p, seed, server.device)


def stop_strings(body: dict) -> list:
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, f"stop must be a string or an array of up to 4 non-empty strings, got "
                       f"{json.dumps(body.get('stop'))[:40]}", param="stop")
    return stop


def chat_prompt(body: dict, server) -> list[int]:
    """The prompt of a chat request: its messages through the model's chat template."""
    if server.chat_format is None:
        raise ApiError(400, f"{server.model_id} has no chat template: use /v1/completions")
    messages = option(body, "messages", "an array", [])
    if not messages:
        raise ApiError(400, "messages must be a non-empty array of {\"role\": ..., \"content\": ...}", param="messages")
    turns = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object", param=where)
        role = "system" if message.get("role") == "developer" else message.get("role")  # OpenAI's new name
        if role not in ROLES:
            raise ApiError(400, f"{where}.role must be system, developer, user, assistant or tool, got "
                           f"{json.dumps(message.get('role'))[:40]}", param=f"{where}.role")
        turns.append({"role": role, "content": message_text(message.get("content"), f"{where}.content")})
    return server.chat_format.encode_dialog_prompt(turns)


def message_text(content, where: str) -> str:
    """A message's text: a string, or OpenAI's array of content parts, of which only text ones."""
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        kinds = {part.get("type") for part in content} - {"text"}
        if kinds:
            raise ApiError(400, f"{where}: this server reads text only, not {', '.join(map(str, kinds))}", param=where)
        content = "\n".join(part.get("text") for part in content) if all(
            isinstance(part.get("text"), str) for part in content) else None
    if not isinstance(content, str):
        raise ApiError(400, f"{where} must be a string or an array of text parts (tool calls are not supported)",
                       param=where)
    return content


def completion_prompt(body: dict, server) -> list[int]:
    """The prompt of a plain completion: begin-of-text and its text, or token ids as they are."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # an array of one prompt
    if isinstance(prompt, str):
        return server.tokenizer.encode(prompt, bos=True, eos=False)
    if (isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < server.vocab_size for t in prompt)):
        return prompt
    raise ApiError(400, "prompt must be a string, or token ids (one prompt per request)", param="prompt")


def choice(request: Request, text: Optional[str], logprobs: list, finish: Optional[str], chunk: bool) -> dict:
    """One choice of an answer (the whole one, or a streamed chunk's) in OpenAI's format."""
    if request.chat:
        body = {"delta": {} if text is None else {"content": text}} if chunk else {
            "message": {"role": "assistant", "content": text}}
        logprobs = {"content": logprobs} if request.options.logprobs is not None else None
    else:
        body = {"text": text or ""}
        logprobs = legacy_logprobs(logprobs) if request.options.logprobs is not None else None
    return {"index": 0, **body, "logprobs": logprobs, "finish_reason": finish}


def legacy_logprobs(entries: list) -> dict:
    """/v1/completions' older logprobs layout: parallel lists."""
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries]}


def answer(request: Request, model_id: str, choices: list, chunk: bool, usage: Optional[dict] = None) -> dict:
    kind = "chat.completion" + (".chunk" if chunk else "") if request.chat else "text_completion"
    body = {"id": request.id, "object": kind, "created": request.created, "model": model_id, "choices": choices}
    if usage or (chunk and request.options.include_usage):
        body["usage"] = usage  # with include_usage every chunk has it: null until the last
    return body


def usage(request: Request, completion_tokens: int) -> dict:
    return {"prompt_tokens": len(request.prompt), "completion_tokens": completion_tokens,
            "total_tokens": len(request.prompt) + completion_tokens}


# ---------------------------------------------------------------------------------------------
# HTTP: a thread per connection.
# ---------------------------------------------------------------------------------------------

class Server(ThreadingHTTPServer):
    """The HTTP server, and what its handlers share: the model's name and limits, the queue to
    the model thread."""

    daemon_threads = True  # a connection left open does not keep the process alive

    def __init__(self, address, model, tokenizer, model_id: str, *, slots: int, queue_size: int, api_key,
                 max_request_bytes: int, sampling: dict, log):
        self.connections: set[socket.socket] = set()  # the clients' connections, open now
        super().__init__(address, Handler)  # binds: an OSError if it cannot
        self.model_id, self.tokenizer, self.device, self.log = model_id, tokenizer, model.device, log
        self.max_seq_len, self.vocab_size, self.slots = model.params.max_seq_len, model.params.vocab_size, slots
        self.temperature, self.top_p, self.top_k = sampling["temperature"], sampling["top_p"], sampling["top_k"]
        self.api_key, self.max_request_bytes = api_key, max_request_bytes
        try:
            self.chat_format = llama_models.ChatFormat(tokenizer)
        except ValueError:  # a base model without a chat template: /v1/completions only
            self.chat_format = None
        self.waiting = queue.Queue(maxsize=queue_size)  # handlers -> the model thread
        self.batch = Batch(model)
        self.stopping = threading.Event()
        self.open: set[Request] = set()  # submitted, not answered yet

    def submit(self, request: Request) -> None:
        """Hand a request to the model thread, or refuse it: 429 when the queue is full."""
        if self.stopping.is_set():
            raise ApiError(503, "the server is stopping", kind="server_error")
        try:
            self.waiting.put_nowait(request)
        except queue.Full:
            raise ApiError(429, f"all {self.slots} slots are busy and {self.waiting.maxsize} requests are waiting; "
                           f"try again shortly", kind="requests", code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        self.open.add(request)

    def handle_error(self, connection, client_address):
        """What escaped a handler (the socket failed between requests): quiet for a client gone,
        one line for anything else, never a traceback."""
        error = sys.exc_info()[1]
        if not isinstance(error, (ConnectionError, TimeoutError)):
            self.log(f"connection from {client_address[0]}: {type(error).__name__}: {error}")

    def process_request(self, connection, client_address):
        self.connections.add(connection)
        super().process_request(connection, client_address)  # its thread runs a Handler

    def shutdown_request(self, connection):
        self.connections.discard(connection)
        super().shutdown_request(connection)

    def server_close(self, wait_s: float = 5.0) -> None:
        """Stop listening, then end the connections still open: a client's idle keep-alive
        connection keeps its thread waiting for a next request, and a thread still running when
        the interpreter exits can take the process down with it. Waits up to wait_s for them."""
        super().server_close()
        for connection in list(self.connections):
            with contextlib.suppress(OSError):  # its client closed it already
                connection.shutdown(socket.SHUT_RDWR)  # the thread reads the end and finishes
        deadline = time.monotonic() + wait_s
        while self.connections and time.monotonic() < deadline:
            time.sleep(0.01)


class Handler(BaseHTTPRequestHandler):
    """One connection: read a request, check it, hand it to the model thread, write what comes."""

    protocol_version = "HTTP/1.1"  # keep-alive: a client's requests share its connection
    server_version = "llama-local"
    timeout = 300  # seconds a silent connection is kept

    def do_GET(self):
        self.handle_api({"/health": self.health, "/v1/models": self.models})

    def do_POST(self):
        self.handle_api({"/v1/chat/completions": lambda: self.complete(chat=True),
                         "/v1/completions": lambda: self.complete(chat=False)})

    def handle_api(self, routes: dict) -> None:
        path = self.path.split("?")[0].rstrip("/")
        route = routes.get(path)
        if route is None and self.command == "GET" and path.startswith("/v1/models/"):
            route = lambda: self.models(path.removeprefix("/v1/models/"))  # noqa: E731
        try:
            if route is None:
                raise ApiError(404, f"no route {self.command} {path}", code="unknown_url")
            if path != "/health":
                self.check_key()
            route()
        except ApiError as e:
            self.server.log(f"{self.command} {path}: {e.status} {e}")
            self.send_json(e.status, e.body, e.headers)
        except (ConnectionError, TimeoutError):
            self.close_connection = True  # the client went away: nobody to tell
        except Exception as e:  # a bug: one line in the log, the connection closed, the server goes on
            self.server.log(f"{self.command} {path}: failed ({type(e).__name__}: {e}); the connection is closed")
            self.close_connection = True

    def check_key(self) -> None:
        key = self.server.api_key
        if key is not None and not hmac.compare_digest(self.headers.get("Authorization", "").encode(),
                                                       f"Bearer {key}".encode()):
            raise ApiError(401, "a missing or wrong API key: send the header \"Authorization: Bearer KEY\"",
                           code="invalid_api_key")

    def health(self) -> None:
        server = self.server
        self.send_json(200, {"status": "ok", "model": server.model_id, "slots": server.slots,
                             "busy": len(server.batch.rows), "waiting": server.waiting.qsize()})

    def models(self, model_id: Optional[str] = None) -> None:
        card = {"id": self.server.model_id, "object": "model", "created": 0, "owned_by": "llama-local"}
        if model_id is None:
            self.send_json(200, {"object": "list", "data": [card]})
        elif model_id == self.server.model_id:
            self.send_json(200, card)
        else:
            raise ApiError(404, f"the model {model_id!r} does not exist (this server has {self.server.model_id!r})",
                           param="model", code="model_not_found")

    def complete(self, chat: bool) -> None:
        server = self.server
        body = self.read_json()
        model_id = option(body, "model", "a string", server.model_id)
        if model_id != server.model_id:
            raise ApiError(404, f"the model {model_id!r} does not exist (this server has {server.model_id!r})",
                           param="model", code="model_not_found")
        prompt = chat_prompt(body, server) if chat else completion_prompt(body, server)
        request = Request(server.tokenizer, prompt, parse_options(body, server, prompt, chat), chat)
        server.submit(request)
        try:
            if request.options.stream:
                self.stream(request)
            else:
                self.whole(request)
        finally:
            request.answered.set()
            server.open.discard(request)

    def read_json(self) -> dict:
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            self.close_connection = True  # the body, if any, is not read: the connection cannot go on
            raise ApiError(411, "the request needs a Content-Length header")
        if int(length) > self.server.max_request_bytes:
            self.discard(int(length))
            raise ApiError(413, f"the request body is {length} bytes; this server takes at most "
                           f"{self.server.max_request_bytes} (--max-request-bytes)")
        try:
            body = json.loads(self.rfile.read(int(length)))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise ApiError(400, f"the body is not valid JSON: {str(e)[:80]}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def discard(self, length: int) -> None:
        """Read a refused body and drop it, so that a client still sending it gets to read the
        answer; one far beyond the limit is not worth reading: the connection closes instead."""
        if length > 64 * self.server.max_request_bytes:
            self.close_connection = True
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                break
            length -= len(chunk)

    def events(self, request: Request):
        """The request's events as they come, to its last; a client gone away ends them (and, at
        the model thread's next step, frees its row)."""
        while True:
            try:
                event = request.events.get(timeout=CLIENT_POLL_S)
            except queue.Empty:
                event = None
            if self.client_gone():
                request.gone.set()
                raise ConnectionResetError("the client went away")
            if event is not None:
                yield event
                if not isinstance(event, Piece):
                    return

    def client_gone(self) -> bool:
        """Whether the client closed its end: the socket is readable and reads as end of file."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        try:
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def whole(self, request: Request) -> None:
        """One JSON answer, when the text is complete."""
        text, logprobs = [], []
        for event in self.events(request):
            if isinstance(event, Piece):
                text.append(event.text)
                logprobs += event.logprobs
            elif isinstance(event, Failed):
                raise ApiError(event.status, event.message, kind="server_error")
            else:
                self.send_json(200, answer(request, self.server.model_id,
                                           [choice(request, "".join(text), logprobs, event.finish_reason, False)],
                                           False, usage(request, event.completion_tokens)))

    def stream(self, request: Request) -> None:
        """Server-sent events: a chunk per step, a last chunk with finish_reason, then [DONE]."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends with the connection: no length to say
        self.end_headers()
        self.close_connection = True
        model_id = self.server.model_id
        if request.chat:  # OpenAI's first chunk says who speaks
            self.send_event(answer(request, model_id, [choice(request, "", [], None, True)
                                                      | {"delta": {"role": "assistant", "content": ""}}], True))
        for event in self.events(request):
            if isinstance(event, Piece):
                self.send_event(answer(request, model_id, [choice(request, event.text, event.logprobs, None, True)],
                                       True))
            elif isinstance(event, Failed):  # the openai client raises an APIError with this message
                self.send_event({"error": {"message": event.message, "type": "server_error", "param": None,
                                           "code": None}})
            else:
                self.send_event(answer(request, model_id, [choice(request, None, [], event.finish_reason, True)],
                                       True))
                if request.options.include_usage:
                    self.send_event(answer(request, model_id, [], True, usage(request, event.completion_tokens)))
        self.wfile.write(b"data: [DONE]\n\n")

    def send_event(self, body: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(body).encode() + b"\n\n")
        self.wfile.flush()

    def send_json(self, status: int, body: dict, headers: Optional[dict] = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request line, an unknown method) as OpenAI's
        error object too, and one line in the log."""
        error = ApiError(code, message or explain or "the request could not be read")
        self.server.log(f"{self.requestline or 'a request'}: {code} {error}")
        self.close_connection = True
        self.send_json(code, error.body)

    def log_message(self, format, *args):
        pass  # the model thread logs each request's life, handle_api each refusal


# ---------------------------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------------------------

def make_log():
    """log(line): one line on stderr, with the time; whole lines, from any thread."""
    lock = threading.Lock()

    def log(line: str) -> None:
        with lock:
            print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)
    return log


def main(argv=None):
    args = parse_args(argv)
    log = make_log()
    with cli.user_errors():  # bad input or a missing checkpoint: one line and exit status 1
        device = cli.start(args.threads, args.device)
        args.model_dir = cli.checkpoint_dir(args.model_dir)
        start = time.perf_counter()
        model, tokenizer = llama_models.load(args.model_dir, device=device, dtype=args.dtype,
                                             max_seq_len=args.max_seq_len, max_batch_size=args.slots,
                                             quantize=args.quantize, max_memory=args.max_memory)
        load_s = time.perf_counter() - start
        try:
            server = Server((args.host, args.port), model, tokenizer, args.model_dir.name, slots=args.slots,
                            queue_size=args.queue, api_key=args.api_key, max_request_bytes=args.max_request_bytes,
                            sampling=dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k), log=log)
        except (OSError, OverflowError) as e:
            raise ValueError(f"cannot listen on {args.host}:{args.port}: {getattr(e, 'strerror', None) or e}") from None
    print(f"loaded {args.model_dir} in {load_s:.1f} s", file=sys.stderr)
    print(model_summary(model), file=sys.stderr)
    host, port = server.server_address[:2]
    print(f"serving {server.model_id} at http://{host}:{port}/v1 ({args.slots} slots, up to {args.queue} waiting"
          f"{', API key required' if args.api_key else ''}); Ctrl-C stops", file=sys.stderr, flush=True)
    if host not in ("127.0.0.1", "::1", "localhost") and not args.api_key:
        print("note: open to the network and no --api-key: anyone who can reach this port can use the model",
              file=sys.stderr)
    model_thread = threading.Thread(target=decode_forever, args=(server.batch, server.waiting, server.stopping, log),
                                    name="model", daemon=True)
    model_thread.start()
    try:
        server.serve_forever()
    finally:  # Ctrl-C: the step under way finishes, the open requests hear why they end
        server.stopping.set()
        model_thread.join()
        deadline = time.monotonic() + 5
        for request in list(server.open):
            request.answered.wait(timeout=max(0.0, deadline - time.monotonic()))
        server.server_close()


def parse_args(argv=None):
    parser = cli.ArgumentParser(__doc__)
    cli.add_flags(parser, "--model-dir", "--max-seq-len", "--device", "--dtype", "--threads", "--quantize",
                  "--max-memory")
    add = parser.add_argument
    add("--host", default=HOST, help="the address to listen on: 127.0.0.1 is this machine only, 0.0.0.0 every network")
    add("--port", type=cli.at_least(0), default=PORT, help="the port to listen on; 0: any free one")
    add("--api-key", default=API_KEY, help="require the header \"Authorization: Bearer KEY\" (unset: no key)")
    add("--slots", type=cli.at_least(1), default=SLOTS, help="conversations decoded together: rows of the KV cache")
    add("--queue", type=cli.at_least(1), default=QUEUE, help="requests that may wait for a slot; beyond: 429")
    add("--max-request-bytes", type=cli.at_least(1), default=MAX_REQUEST_BYTES,
        help="the largest request body accepted (413 beyond)")
    # A request's own temperature, top_p, seed... win; these are for requests that give none.
    cli.add_flags(parser, "--temperature", "--top-k", "--top-p")
    return parser.parse_args(argv)


if __name__ == "__main__":
    cli.run(main)
