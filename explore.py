"""Inside the model: how the prompt is cut into tokens, what each block adds, where attention looks.

One forward pass over the prompt, recorded, shown in three sections:

- tokens: each position's id, text and line in tokenizer.model, whose base64 is decoded beside it;
- the logit lens: the residual stream after every block, read by the final norm and output head as
  if the model stopped there: when does it "know" its answer?
- attention: which earlier tokens the chosen position reads most, per head and on average.

--plot DIR draws the logit lens as a grid and each chosen block's attention as heat maps (PNG,
needs matplotlib: pip install -r requirements-explore.txt). docs/explore.md shows real output and
how to read it. Edit the globals below and run it, or override them with flags:
    python explore.py --model-dir ~/.llama/checkpoints/SmolLM2-135M-Instruct
    python explore.py --prompt "The capital of France is" --sections lens
    python explore.py --sections attention --layers 0,-1 --heads 0,3 --position -1
    python explore.py --plot figures --plot-layers 5 --heads 0,3
The functions are importable and do nothing on import; in a notebook:
    rec = explore.record(model, tokens)           # logits, hidden states, attention probabilities
    explore.logit_lens(model, rec.hidden[:, -1])  # (n_layers + 1, vocab) probabilities
"""

import base64
import math
import os
import sys
import warnings
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

import llama_models
from llama_models import cli, generation
from llama_models.generation import token_text
from llama_models.report import model_summary

# --- what to look inside (the model, the device and the rest: llama_models/cli.py, or --help) ---
INPUT_STRING = "The capital of France is"  # the text to look inside
# Plain text by default, even for an Instruct model: the tokens are then the prompt's own. With
# CHAT the prompt is wrapped in the chat template first, special tokens and all.
CHAT = False

# --- what to show ---
SECTIONS = "tokens,lens,attention"  # any of them, comma-separated, in this order
POSITION = -1  # the position the logit lens and attention sections look from; -1: the last
LAYERS = "all"  # blocks the attention section shows: "all", "none", or e.g. "0,5,-1" (negative: from the end)
HEADS = "all"  # heads shown one by one under each block's average: "all", "none" or e.g. "0,3"
TOP = 3  # tokens per logit-lens row; earlier tokens per attention line
PLOT_DIR = None  # a directory to write PNG figures into; None: no figures
# The blocks --plot draws attention heat maps of, one figure each (a second or two per figure):
# the first block, which reads the words themselves, and the last, where most heads rest on the first token.
PLOT_LAYERS = "0,-1"
# A longer prompt is cut to its last positions, the ones nearest the prediction: what a figure
# can label legibly on a screen. Attention shows their rows and the keys they weigh most.
PLOT_POSITIONS = 16
PLOT_DPI = 100  # pixels per inch of the figures: at 100 none is wider or taller than 2000 pixels


# ---------------------------------------------------------------------------------------------
# One forward pass, recorded.
# ---------------------------------------------------------------------------------------------

class Recording(NamedTuple):
    """What one forward pass over a prompt computed (batch row 0; float32 where noted)."""
    logits: torch.Tensor  # (seq, vocab) float32: the model's output at each position
    hidden: torch.Tensor  # (n_layers + 1, seq, dim): the residual stream before block 0, after each block
    attention: Optional[torch.Tensor]  # (len(layers), n_heads, seq, seq) float32: query x key probabilities
    layers: list[int]  # the blocks `attention` holds, in its order


class RecordedAttention(nn.Module):
    """What the model's ScaledDotProductAttention computes, step by step, keeping the probabilities.

    record() swaps it in for a block's fused attention (Attention.attend) while it records, as
    quantization swaps in its linear layers: the model itself has one attention path.
    """

    def __init__(self, fused: nn.Module):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = fused.n_heads, fused.n_kv_heads, fused.head_dim
        self.weights = None  # (B, H, S, kv_len) float32, the last call's

    def forward(self, xq, keys, values, mask):
        """xq: (B, H, S, Hd); keys, values: (B, K, kv_len, Hd); mask: (B|1, 1, S, kv_len) bool or None."""
        group = self.n_heads // self.n_kv_heads
        keys = keys.repeat_interleave(group, dim=1)  # (B, H, kv_len, Hd): query head h reads kv head h // group
        values = values.repeat_interleave(group, dim=1)  # (B, H, kv_len, Hd)
        scores = xq @ keys.transpose(2, 3) / math.sqrt(self.head_dim)  # (B, H, S, kv_len)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))  # a later position gets probability 0
        # The softmax in float32 even for bf16 activations, as transformers' eager attention does.
        self.weights = scores.float().softmax(dim=-1)  # (B, H, S, kv_len), each row sums to 1
        return self.weights.type_as(values) @ values  # (B, H, S, Hd)


@torch.inference_mode()
def record(model, tokens: Sequence[int], attention: bool = True, layers: Optional[Sequence[int]] = None) -> Recording:
    """Run the prompt through the model once and keep what happens inside.

    The hidden states come from forward hooks on the blocks, the attention probabilities from a
    RecordedAttention swapped in for each chosen block's fused attention: they are the very
    numbers its output is made of. The KV cache is overwritten from position 0.

    Args:
        model: a llama_models.Transformer in one process.
        tokens: the prompt's token ids, at most model.params.max_seq_len of them.
        attention: record attention probabilities; False leaves attention on its fused kernel.
        layers: the blocks whose attention to record (default all); each costs n_heads * seq**2 floats.
    Returns:
        Recording: logits (seq, vocab), hidden (n_layers + 1, seq, dim) in the model's dtype,
        attention (len(layers), n_heads, seq, seq) or None.
    """
    layers = list(range(len(model.layers))) if layers is None else list(layers)
    hidden = []
    # The input of block 0 is the token embeddings; each block's output is the next one's input.
    hooks = [model.layers[0].register_forward_pre_hook(lambda module, args: hidden.append(args[0][0]))]
    hooks += [block.register_forward_hook(lambda module, args, out: hidden.append(out[0])) for block in model.layers]
    swapped = [model.layers[i].attention for i in layers] if attention else []
    fused = [module.attend for module in swapped]
    for module in swapped:
        module.attend = RecordedAttention(module.attend)
    try:
        logits = model(torch.tensor([list(tokens)], device=model.device), start_pos=0)[0]  # (S, V)
        weights = torch.stack([module.attend.weights[0] for module in swapped]) if swapped else None  # (layers, H, S, S)
    finally:  # also on Ctrl-C: leave the model as fast as it was
        for hook in hooks:
            hook.remove()
        for module, original in zip(swapped, fused):
            module.attend = original
    return Recording(logits, torch.stack(hidden), weights, layers)


def hidden_states(model, tokens: Sequence[int]) -> torch.Tensor:
    """(n_layers + 1, seq, dim): entry 0 the embeddings, entry i the residual stream after block i-1.

    The last entry is before the final norm (transformers' output_hidden_states gives it after).
    """
    return record(model, tokens, attention=False).hidden


def attention_weights(model, tokens: Sequence[int]) -> torch.Tensor:
    """(n_layers, n_heads, seq, seq) float32: how much each query position (row) attends to each
    key position (column); rows sum to 1 and are 0 right of the diagonal (causal)."""
    return record(model, tokens).attention


@torch.inference_mode()
def logit_lens(model, hidden: torch.Tensor) -> torch.Tensor:
    """The output distribution a residual stream would give if the model stopped there.

    Args:
        hidden: (..., dim) residual stream states, e.g. Recording.hidden[:, position].
    Returns:
        (..., vocab) float32 probabilities: softmax(output(norm(hidden))).
    """
    # Why this means something: every block *adds* its output to one running vector, the residual
    # stream, and the final norm and output head read that same vector at the end. So they can
    # read it after any block: what the model would say were the remaining blocks skipped
    # (nostalgebraist, "interpreting GPT: the logit lens", 2020). Where it misleads: the head was
    # trained on the last block's output only. Early states may hold the answer in directions the
    # head does not read (a learned per-layer translation, the "tuned lens", reads them better:
    # Belrose et al. 2023), so a low rank early on does not prove the information is absent. And
    # with tied embeddings (SmolLM2) the lens of the input embeddings scores each token by the dot
    # product of its row with the input's: the input token wins only where its own row dominates.
    # A longer row pointing much the same way can beat it, and SmolLM2's rows share one direction,
    # so most tokens' lens names one of a few long rows (' strugg', '<filename>'), not themselves.
    return model.output_logits(model.norm(hidden)).softmax(dim=-1)


# ---------------------------------------------------------------------------------------------
# Tokens and tokenizer.model.
# ---------------------------------------------------------------------------------------------

class TokenRow(NamedTuple):
    position: int
    id: int
    text: str  # repr of the token's text, or of its bytes where they are not valid UTF-8 alone
    special: bool  # a control token: not made from text, not in tokenizer.model
    line: Optional[int]  # its line number in tokenizer.model (None for a special token)
    base64: Optional[str]  # that line's first field: base64 of the token's bytes


def vocabulary_lines(path: Path, ids) -> dict[int, tuple[int, str]]:
    """{id: (line number, base64 text)} for the given ids, read from tokenizer.model.

    The file is the whole byte-level BPE vocabulary: one `base64(token bytes) id` pair per line.
    The id is also the token's merge rank: BPE merges the pair whose result has the lowest id
    first, so the single bytes come first and long, rare words last.
    """
    wanted, found = set(ids), {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if len(fields) == 2 and int(fields[1]) in wanted:
                found[int(fields[1])] = (number, fields[0].decode("ascii"))
    return found


def token_rows(tokenizer, tokenizer_path: Path, tokens: Sequence[int]) -> list[TokenRow]:
    special = set(tokenizer.special_tokens.values())
    lines = vocabulary_lines(tokenizer_path, [t for t in tokens if t not in special])
    names = {i: name for name, i in tokenizer.special_tokens.items()}
    rows = []
    for position, token in enumerate(tokens):
        line, b64 = lines.get(token, (None, None))
        text = names[token] if token in special else token_text(tokenizer, token)
        rows.append(TokenRow(position, token, text, token in special, line, b64))
    return rows


def print_tokens(rows: list[TokenRow], tokenizer_path: Path) -> None:
    print(f"== tokens: {len(rows)} ==")
    print(f"{tokenizer_path.name} is the vocabulary, one `base64(token bytes) id` pair per line; each "
          f"token's line, decoded:")
    width = max(12, *(len(r.text) for r in rows))
    print(f"{'pos':>4} {'id':>7}  {'text':<{width}}  {'line':>7}  base64 -> bytes")
    for r in rows:
        if r.special:
            where = "special token: a control id, in no line of the file"
        else:
            where = f"{r.line:>7}  {r.base64} -> {base64.b64decode(r.base64)!r}"
        print(f"{r.position:>4} {r.id:>7}  {r.text:<{width}}  {where}")
    print()


# ---------------------------------------------------------------------------------------------
# The logit lens and attention, printed.
# ---------------------------------------------------------------------------------------------

def layer_name(i: int) -> str:
    """Row i of Recording.hidden: 0 is the embeddings, i the output of block i - 1."""
    return "embedding" if i == 0 else f"block {i - 1}"


def print_logit_lens(model, tokenizer, rec: Recording, tokens, position: int, top: int) -> None:
    probs = logit_lens(model, rec.hidden[:, position])  # (n_layers + 1, V)
    final = int(rec.logits[position].argmax())
    final_text = token_text(tokenizer, final)
    # The rank of the final prediction at each layer: 1 + how many tokens are more likely.
    ranks = (probs > probs[:, final:final + 1]).sum(dim=-1) + 1  # (n_layers + 1,)
    print(f"== logit lens at position {position} ({token_text(tokenizer, tokens[position])}) ==")
    print(f"the residual stream after each block, through the final norm and the output head; the model's "
          f"prediction is {final_text} ({float(rec.logits[position].softmax(-1)[final]):.3f})")
    rows = []
    for i in range(len(probs)):
        best = probs[i].topk(top)
        rows.append("  ".join(f"{token_text(tokenizer, int(t))} {float(p):.3f}"
                              for p, t in zip(best.values, best.indices)))
    heading = f"top {top}"
    width = max(len(heading), *(len(r) for r in rows))
    print(f"{'after':<10} {heading:<{width}}  {final_text}: rank, probability")
    for i, row in enumerate(rows):
        print(f"{layer_name(i):<10} {row:<{width}}  {int(ranks[i]):>7}  {float(probs[i, final]):.4f}")
    first = next((i for i in range(len(ranks)) if ranks[i:].eq(1).all()), None)
    if first is not None:  # (None only if the lens of the last block and the logits tie differently)
        print(f"{final_text} is the top token from {layer_name(first)} on")
    print()


def print_attention(tokenizer, rec: Recording, tokens, position: int, blocks: list[int], heads: list[int],
                    top: int) -> None:
    # The attention sink: a head's probabilities must sum to 1 over the positions it may read, so a
    # head with nothing useful to read at this position still has to put its weight somewhere.
    # Trained models learn to put it on the first token, which every position can see; its value
    # vectors are small, so the weight buys little. Most heads of most layers show it (Xiao et al.
    # 2023, "Efficient streaming language models with attention sinks": drop the first token from a
    # sliding window and the text degrades at once). Heads that do look at content stand out by
    # *not* weighing position 0 most.
    label = [f"{token_text(tokenizer, t)}({i})" for i, t in enumerate(tokens)]
    n = min(top, position + 1)
    print(f"== attention from position {position} ({label[position]}): the {n} tokens it weighs most, "
          f"as text(position) probability ==")

    def line(weights):  # (S,) one query's probabilities over the keys 0..position
        best = weights[:position + 1].topk(n)
        return "  ".join(f"{label[int(k)]} {float(w):.3f}" for w, k in zip(best.values, best.indices))

    rows = rec.attention[[rec.layers.index(b) for b in blocks], :, position]  # (blocks, H, S)
    for block, weights in zip(blocks, rows):
        print(f"block {block:<3} mean    {line(weights.mean(dim=0))}")
        for h in heads:
            print(f"          head {h:<3}{line(weights[h])}")
    sink = float(rows[:, :, 0].mean())
    print(f"weight on position 0, averaged over these blocks and all heads: {sink:.3f} (the attention sink)\n")


# ---------------------------------------------------------------------------------------------
# Pictures (matplotlib, optional).
# ---------------------------------------------------------------------------------------------

def import_matplotlib():
    """matplotlib's Figure, or ValueError saying how to install it."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no window, no global state, any machine
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install -r requirements-explore.txt") from None
    return Figure


MAX_INCHES = 20.0  # the long side of every figure: 2000 pixels at PLOT_DPI, about a screen's width
PANELS_PER_FIGURE = 12  # attention panels (heads, and the mean) per figure, 4 to a row; more heads: more figures


def lens_figure_size(n_positions: int, n_rows: int) -> tuple[float, float]:
    """Inches: a cell 1.1 wide per position (PLOT_POSITIONS of them: under 20 inches) and 0.28
    high per layer, less for a model too deep to fit, plus room for the labels and the title."""
    return max(4.5, 2.0 + 1.1 * n_positions), 1.4 + min(0.28 * n_rows, MAX_INCHES - 1.4)


def attention_figure_size(n_keys: int, n_panels: int) -> tuple[float, float]:
    """Inches: square panels of 0.19 per key (2.5 at least), 4 to a row, plus room for the labels."""
    side = max(2.5, 0.19 * n_keys)
    cols = min(4, n_panels)
    rows = -(-n_panels // cols)
    return 0.8 + (side + 1.4) * cols, 0.9 + (side + 1.4) * rows


def short(text: str, n: int = 10) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def label(tokenizer, tokens, position: int) -> str:
    """A token as a tick label: its text, cut short, and its position."""
    return f"{short(token_text(tokenizer, tokens[position]), 12)}({position})"


def positions_text(shown: Sequence[int], n: int) -> str:
    """Which positions a figure shows, for its title and the line that announces it."""
    if len(shown) == n:
        return f"all {n} positions"
    return f"positions {shown[0]}-{shown[-1]} of {n} (the last {len(shown)})"


def plot_logit_lens(model, tokenizer, rec: Recording, tokens, path: Path, dpi: int, last: int) -> None:
    """A grid, layers (rows) x the last `last` positions (columns): each cell's top token, coloured
    by its probability."""
    Figure = import_matplotlib()
    shown = range(max(0, len(tokens) - last), len(tokens))
    # One position at a time: (n_layers + 1, V) floats each, never (n_layers + 1, S, V).
    best = [logit_lens(model, rec.hidden[:, p]).max(dim=-1) for p in shown]
    probs = torch.stack([b.values for b in best], dim=1)  # (n_layers + 1, shown)
    ids = torch.stack([b.indices for b in best], dim=1)  # (n_layers + 1, shown)
    fig = Figure(figsize=lens_figure_size(len(shown), len(probs)), dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(probs.cpu().numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto", origin="lower")
    for layer in range(probs.shape[0]):
        for col in range(probs.shape[1]):
            dark = probs[layer, col] > 0.6
            ax.text(col, layer, short(token_text(tokenizer, int(ids[layer, col]))), ha="center",
                    va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(shown)), [label(tokenizer, tokens, p) for p in shown], rotation=30, ha="right",
                  fontsize=9)
    ax.set_yticks(range(len(probs)), [layer_name(i) for i in range(len(probs))], fontsize=9)
    ax.set_xlabel("input position (the next token is predicted after it)", fontsize=10)
    ax.set_title(f"logit lens: the top next token after each block\n{positions_text(shown, len(tokens))}",
                 fontsize=12)
    fig.colorbar(image, ax=ax, shrink=0.6).set_label("probability of the top token", fontsize=10)
    save(fig, path, positions_text(shown, len(tokens)))


def attention_cut(weights: torch.Tensor, last: int) -> tuple[list[int], list[int]]:
    """(query rows, key columns) a figure shows: the last `last` positions, and the `last` keys
    they weigh most on average over all heads, in order. weights: (H, S, S)."""
    n = weights.shape[-1]
    rows = list(range(max(0, n - last), n))
    if n <= last:
        return rows, rows
    weight_per_key = weights[:, rows].mean(dim=0).sum(dim=0)  # (S,): what the shown rows read from each key
    return rows, sorted(weight_per_key.topk(last).indices.tolist())


def plot_attention(tokenizer, rec: Recording, tokens, block: int, heads: list[int], directory: Path, dpi: int,
                   last: int) -> None:
    """One block's attention: a query x key heat map per head, and the mean over all heads, in as
    many figures as it takes (PANELS_PER_FIGURE each)."""
    Figure = import_matplotlib()
    weights = rec.attention[rec.layers.index(block)]  # (H, S, S)
    rows, keys = attention_cut(weights, last)
    panels = [(f"head {h}", weights[h]) for h in heads] + [("mean over heads", weights.mean(dim=0))]
    cut = len(keys) < len(tokens)
    where = f"rows: {positions_text(rows, len(tokens))}"
    if cut:  # what the shown rows read from the keys left out, in one column: each row still sums to 1
        where += f"\ncolumns: the {len(keys)} keys they weigh most, then all others"
    groups = [panels[i:i + PANELS_PER_FIGURE] for i in range(0, len(panels), PANELS_PER_FIGURE)]
    for number, group in enumerate(groups, 1):
        part = f" (figure {number} of {len(groups)})" if len(groups) > 1 else ""
        fig = Figure(figsize=attention_figure_size(len(keys) + cut, len(group)), dpi=dpi, layout="constrained")
        cols = min(4, len(group))
        axes = fig.subplots(-(-len(group) // cols), cols, squeeze=False).flatten()
        for ax, (title, matrix) in zip(axes, group):
            shown = matrix[rows][:, keys]  # (rows, keys)
            if cut:
                shown = torch.cat([shown, 1 - shown.sum(dim=-1, keepdim=True)], dim=-1)  # (rows, keys + 1)
            image = ax.imshow(shown.cpu().numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_title(title, fontsize=11)
            ax.set_xticks(range(shown.shape[1]), [label(tokenizer, tokens, k) for k in keys] + ["others"] * cut,
                          rotation=90, fontsize=8)
            ax.set_yticks(range(len(rows)), [label(tokenizer, tokens, q) for q in rows], fontsize=8)
            ax.set_xlabel("key (attended to)", fontsize=9)
            ax.set_ylabel("query", fontsize=9)
        for ax in axes[len(group):]:
            ax.set_axis_off()
        fig.colorbar(image, ax=axes.tolist(), shrink=0.6).set_label("attention probability", fontsize=10)
        fig.suptitle(f"block {block}: attention, query (row) x key (column){part}\n{where}", fontsize=12)
        name = f"attention-block-{block:02d}" + (f"-{number}" if len(groups) > 1 else "") + ".png"
        save(fig, directory / name, f"{group[0][0]} to {group[-1][0]}; " + where.replace("\n", "; "))


def save(fig, path: Path, shows: str) -> None:
    with warnings.catch_warnings():  # a token outside the font's glyphs draws as a box; no warning each time
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        try:
            fig.savefig(path, dpi=fig.dpi)  # no bbox_inches="tight": the size is the figure's own
        except OSError as e:
            raise ValueError(f"cannot write {path}: {e.strerror or e}") from None
    width, height = fig.get_size_inches() * fig.dpi
    print(f"wrote {path} ({round(width)} x {round(height)} pixels): {shows}")


def check_plot_dir(path: Path) -> None:
    """Raise ValueError if the --plot directory could not be made or written; make nothing.

    Checked before the model loads (a bad folder fails fast), made only once everything else has
    passed: a refused command leaves no folder behind.
    """
    existing = path
    while not existing.exists() and existing != existing.parent:  # the folder mkdir would start from
        existing = existing.parent
    if not existing.is_dir():
        problem = "File exists" if existing == path else f"{existing} is not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = "Permission denied"
    else:
        return
    raise ValueError(f"--plot {path}: cannot write figures there ({problem})")


def plot_dir(path: Path) -> Path:
    """Make the --plot directory, or raise ValueError saying why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".explore-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--plot {path}: cannot write figures there ({e.strerror or e})") from None
    return path


# ---------------------------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = cli.ArgumentParser(__doc__)
    cli.add_flags(parser, "--model-dir", "--prompt", "--prompt-file", "--chat", "--system", "--max-seq-len",
                  "--device", "--dtype", "--threads", prompt=INPUT_STRING, chat=CHAT)
    add = parser.add_argument
    add("--sections", default=SECTIONS, help="what to print: tokens, lens, attention (comma-separated)")
    add("--position", type=int, default=POSITION, help="the position the lens and attention look from; -1: the last")
    add("--layers", default=LAYERS, help="blocks the attention section shows: all, none, or e.g. 0,5,-1")
    add("--heads", default=HEADS, help="heads shown one by one: all, none, or e.g. 0,3")
    add("--top", type=cli.at_least(1), default=TOP, help="tokens per logit-lens row and per attention line")
    add("--plot", type=Path, default=PLOT_DIR, metavar="DIR", help="write PNG figures into DIR (needs matplotlib)")
    add("--plot-layers", default=PLOT_LAYERS, help="blocks --plot draws attention heat maps of: all, none, or e.g. 5")
    add("--plot-positions", type=cli.at_least(1), default=PLOT_POSITIONS, metavar="N",
        help="the figures show the last N positions (attention: and the N keys they weigh most)")
    add("--plot-dpi", type=cli.at_least(10), default=PLOT_DPI, help="pixels per inch of the figures")
    return parser.parse_args(argv)


def parse_sections(text: str) -> list[str]:
    sections = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in sections if s not in ("tokens", "lens", "attention")]
    if unknown or not sections:
        raise ValueError(f"--sections: {', '.join(unknown) or 'none given'}; choose from tokens, lens, attention")
    return sections


def parse_indices(text: str, n: int, flag: str, what: str) -> list[int]:
    """"all", "none" or comma-separated indices (negative ones count from the end) -> [0 .. n-1]."""
    if text.strip() == "all":
        return list(range(n))
    if text.strip() == "none":
        return []
    indices = []
    for field in text.split(","):
        try:
            i = int(field)
        except ValueError:
            raise ValueError(f"{flag}: {field.strip()!r} is not an index; give all, none or e.g. 0,3,-1") from None
        if not -n <= i < n:
            raise ValueError(f"{flag}: {i} is out of range: the model has {n} {what} (0 to {n - 1}, or -{n} to -1)")
        indices.append(i % n)
    return list(dict.fromkeys(indices))  # in the order given, each once


def main(argv=None):
    args = parse_args(argv)
    with cli.user_errors():  # bad input or a missing checkpoint: one line and exit status 1
        sections = parse_sections(args.sections)
        if args.plot is not None:  # before the model loads: a missing package or bad folder fails fast
            import_matplotlib()
            check_plot_dir(args.plot)
        args.prompt = cli.read_prompt(args.prompt, args.prompt_file)
        device = cli.start(args.threads, args.device)
        args.model_dir = cli.checkpoint_dir(args.model_dir)
        model, tokenizer = llama_models.load(args.model_dir, device=device, max_seq_len=args.max_seq_len,
                                             dtype=args.dtype)
        llama_models.print_on_first_process_only()
        print(model_summary(model), file=sys.stderr)
        tokens = generation.encode_prompt(tokenizer, args.prompt, args.chat, args.system)
        n = len(tokens)
        if n > args.max_seq_len:
            raise ValueError(f"the prompt is {n} tokens, more than --max-seq-len {args.max_seq_len}")
        if not -n <= args.position < n:
            raise ValueError(f"--position {args.position} is out of range: the prompt has {n} tokens "
                             f"(0 to {n - 1}, or -{n} to -1)")
        position = args.position % n
        layers = parse_indices(args.layers, model.params.n_layers, "--layers", "blocks")
        layers = layers if "attention" in sections else []
        plot_layers = (parse_indices(args.plot_layers, model.params.n_layers, "--plot-layers", "blocks")
                       if args.plot is not None else [])
        heads = parse_indices(args.heads, model.layers[0].attention.n_local_heads, "--heads", "heads")
    recorded = sorted(set(layers) | set(plot_layers))
    rec = record(model, tokens, attention=bool(recorded), layers=recorded)
    for p in range(n):  # NaN would print as a plausible-looking table: stop, and say why
        generation.check_finite(rec.logits[p], p, model.dtype)

    if "tokens" in sections:
        tokenizer_path = args.model_dir / "tokenizer.model"
        print_tokens(token_rows(tokenizer, tokenizer_path, tokens), tokenizer_path)
    if "lens" in sections:
        print_logit_lens(model, tokenizer, rec, tokens, position, args.top)
    if layers:
        print_attention(tokenizer, rec, tokens, position, layers, heads, args.top)
    if args.plot is not None:
        with cli.user_errors():  # the folder, made now that nothing else can refuse; a figure that cannot be written
            plot_dir(args.plot)
            plot_logit_lens(model, tokenizer, rec, tokens, args.plot / "logit-lens.png", args.plot_dpi,
                            args.plot_positions)
            for block in plot_layers:
                plot_attention(tokenizer, rec, tokens, block, heads, args.plot, args.plot_dpi, args.plot_positions)


if __name__ == "__main__":
    cli.run(main)
