"""The shortest complete path from a Llama 3 checkpoint to generated text: greedy decoding.

Edit the globals below and run it, or override them with flags:
    python minimal_run_inference.py
    python minimal_run_inference.py --model-dir ~/.llama/checkpoints/Llama3.1-8B --prompt "Once upon a time"
    python minimal_run_inference.py --model-dir ~/.llama/checkpoints/Llama3.1-8B --max-memory 4GB   # 16 GB of weights
    git log | python minimal_run_inference.py --prompt-file -   # the prompt from standard input
    torchrun --nproc_per_node 3 minimal_run_inference.py --model-dir ~/.llama/checkpoints/SmolLM2-135M-Instruct
"""

import argparse
import codecs
import sys
import time
from pathlib import Path

import torch

import llama_models
from llama_models import cli

MODEL_NAME = "Llama3.2-1B-Instruct"  # a folder under LLAMA_MODELS_DIR
LLAMA_MODELS_DIR = Path("~/.llama/checkpoints").expanduser()  # where Meta's `llama model download` puts them
INPUT_STRING = "The capital of France is"  # plain completion: the model continues this text
DEVICE = "auto"  # "auto" picks cuda, then mps, then cpu
MAX_NEW_TOKENS = 32  # stop after this many new tokens, or earlier at a stop token
MAX_SEQ_LEN = 2048  # prompt + new tokens; the KV cache is allocated for this many positions
# A model bigger than memory: None keeps every weight in memory; a budget such as "4GB" keeps the
# process within it by reading transformer blocks from the checkpoint file as they run, the next
# ones read ahead while the current one computes (CPU, Linux). Each token then reads the file once.
MAX_MEMORY = None
# CPU threads for the matrix products: one per core but one, so that another busy program does
# not stall every product. See THREADS in run_inference.py.
THREADS = max(1, torch.get_num_threads() - 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=LLAMA_MODELS_DIR / MODEL_NAME,
                        help="checkpoint directory (params.json, consolidated.00.pth, tokenizer.model)")
    parser.add_argument("--prompt", default=INPUT_STRING, help="text to continue")
    parser.add_argument("--prompt-file", help="read the prompt from this file instead; - reads standard input")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="most tokens to generate")
    parser.add_argument("--max-seq-len", type=int, default=MAX_SEQ_LEN, help="KV cache length: prompt + new tokens")
    parser.add_argument("--device", default=DEVICE, help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--max-memory", default=MAX_MEMORY,
                        help="memory budget such as 4GB: stream transformer blocks from disk to stay within it")
    parser.add_argument("--threads", type=int, default=THREADS, help="CPU threads")
    args = parser.parse_args()

    # Bad input, a missing checkpoint or Ctrl-C while loading: one line and an exit code.
    with cli.user_errors(args.model_dir, MODEL_NAME):
        if min(args.max_new_tokens, args.threads) < 1:
            raise ValueError("--max-new-tokens and --threads must be at least 1")
        prompt = cli.read_prompt(args.prompt, args.prompt_file)
        torch.set_num_threads(args.threads)
        device = llama_models.resolve_device(args.device)
        start = time.perf_counter()
        model, tokenizer = llama_models.load(args.model_dir, device=device, max_seq_len=args.max_seq_len,
                                             max_memory=args.max_memory)
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
    with cli.user_errors(args.model_dir, MODEL_NAME), torch.inference_mode():
        try:
            # Prefill: the whole prompt in one forward pass fills the KV cache for positions
            # 0 .. len(tokens)-1; the logits at the last position predict the first new token.
            logits = model(torch.tensor([tokens], device=device), start_pos=0)  # (1, len(tokens), vocab)
            for _ in range(max_new_tokens):
                cli.check_finite(logits, len(tokens), model.norm.weight.dtype)  # NaN: no sensible token
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
    main()
