"""The shortest complete path from a Llama 3 checkpoint to generated text: greedy decoding.

Edit the globals below and run it, or override them with flags:
    python minimal_run_inference.py
    python minimal_run_inference.py --model-dir ~/.llama/checkpoints/Llama3.1-8B --prompt "Once upon a time"
    python minimal_run_inference.py --model-dir ~/.llama/checkpoints/Llama3.1-8B --max-memory 4GB   # 16 GB of weights
    git log | python minimal_run_inference.py --prompt-file -   # the prompt from standard input
    torchrun --nproc_per_node 3 minimal_run_inference.py --model-dir ~/.llama/checkpoints/SmolLM2-135M-Instruct
"""

import codecs
import sys
import time
from pathlib import Path

import torch

import llama_models
from llama_models import cli
from llama_models.generation import check_finite

MODEL_NAME = "Llama3.2-1B-Instruct"  # a folder under LLAMA_MODELS_DIR
LLAMA_MODELS_DIR = Path("~/.llama/checkpoints").expanduser()  # where Meta's `llama model download` puts them
INPUT_STRING = "The capital of France is"  # plain completion: the model continues this text
DEVICE = "auto"  # "auto" picks cuda, then mps, then cpu
MAX_NEW_TOKENS = 32  # stop after this many new tokens, or earlier at a stop token
# The rest (--max-seq-len, --threads, --max-memory for a model bigger than memory): --help, or
# llama_models/cli.py, where the flags the scripts share are defined.


def main():
    parser = cli.ArgumentParser(__doc__)
    cli.add_flags(parser, "--model-dir", "--prompt", "--prompt-file", "--max-new-tokens", "--max-seq-len", "--device",
                  "--threads", "--max-memory", model_dir=LLAMA_MODELS_DIR / MODEL_NAME, prompt=INPUT_STRING,
                  max_new_tokens=MAX_NEW_TOKENS, device=DEVICE)
    args = parser.parse_args()

    with cli.user_errors():  # bad input or a missing checkpoint: one line and exit status 1
        prompt = cli.read_prompt(args.prompt, args.prompt_file)
        device = cli.start(args.threads, args.device)  # torch's CPU threads, then the device
        start = time.perf_counter()
        model, tokenizer = llama_models.load(cli.checkpoint_dir(args.model_dir), device=device,
                                             max_seq_len=args.max_seq_len, max_memory=args.max_memory)
        # Plain completion: <|begin_of_text|> then the text, nothing else.
        tokens = tokenizer.encode(prompt, bos=True, eos=False)
        if len(tokens) >= args.max_seq_len:
            raise ValueError(f"the prompt is {len(tokens)} tokens, which leaves no room for new ones in "
                             f"--max-seq-len {args.max_seq_len}")
    # Under torchrun, every process runs this same loop on its slice of the model.
    llama_models.print_on_first_process_only()
    print(f"loaded {args.model_dir} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if args.max_memory:
        print(model.block_streamer or f"max_memory {args.max_memory} holds the whole model", file=sys.stderr)

    max_new_tokens = min(args.max_new_tokens, args.max_seq_len - len(tokens))
    # One character (an emoji, a CJK ideograph) may span several tokens: feed the bytes of each
    # token to an incremental UTF-8 decoder, which prints a character once it is complete.
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    print(prompt, end="", flush=True)
    with torch.inference_mode():
        try:
            # Prefill: the whole prompt in one forward pass fills the KV cache for positions
            # 0 .. len(tokens)-1; the logits at the last position predict the first new token.
            logits = model(torch.tensor([tokens], device=device), start_pos=0)  # (1, len(tokens), vocab)
            for _ in range(max_new_tokens):
                check_finite(logits, len(tokens), model.dtype)  # NaN: no sensible next token
                next_token = int(logits[0, -1].argmax())  # greedy: the single most likely token
                if next_token in tokenizer.stop_tokens:
                    break
                print(utf8.decode(tokenizer.decode_bytes([next_token])), end="", flush=True)
                tokens.append(next_token)
                # Decode step: only the new token goes in; the cache holds everything before it.
                logits = model(torch.tensor([[next_token]], device=device), start_pos=len(tokens) - 1)
        finally:  # also on Ctrl-C or an error: end the line, keep what was printed
            print(utf8.decode(b"", final=True))


if __name__ == "__main__":
    cli.run(main)  # Ctrl-C: what was printed stays, exit status 130
