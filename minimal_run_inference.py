"""The shortest complete path from a Llama 3 checkpoint to generated text: greedy decoding.

Edit the globals below and run it, or override them with flags:
    python minimal_run_inference.py
    python minimal_run_inference.py --model-dir ~/.llama/checkpoints/Llama3.1-8B --prompt "Once upon a time"
    python minimal_run_inference.py --model-dir ~/.llama/checkpoints/Llama3.1-8B --max-memory 4GB   # 16 GB of weights
    torchrun --nproc_per_node 2 minimal_run_inference.py   # the model split over 2 processes
"""

import argparse
import codecs
import sys
import time
from pathlib import Path

import torch

import llama_models
from llama_models.checkpoint import error_message

MODEL_NAME = "Llama3.2-1B-Instruct"  # a folder under LLAMA_MODELS_DIR
LLAMA_MODELS_DIR = Path("~/.llama/checkpoints").expanduser()  # where Meta's `llama model download` puts them
INPUT_STRING = "The capital of France is"  # plain completion: the model continues this text
DEVICE = "auto"  # "auto" picks cuda, then mps, then cpu
MAX_NEW_TOKENS = 32  # stop after this many new tokens, or earlier at a stop token
# A model bigger than memory: None keeps every weight in memory; a budget such as "4GB" keeps the
# process within it by reading transformer blocks from the checkpoint file as they run, the next
# ones read ahead while the current one computes (CPU, Linux). Each token then reads the file once.
MAX_MEMORY = None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=LLAMA_MODELS_DIR / MODEL_NAME,
                        help="checkpoint directory (params.json, consolidated.00.pth, tokenizer.model)")
    parser.add_argument("--prompt", default=INPUT_STRING, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="most tokens to generate")
    parser.add_argument("--device", default=DEVICE, help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--max-memory", default=MAX_MEMORY,
                        help="memory budget such as 4GB: stream transformer blocks from disk to stay within it")
    args = parser.parse_args()

    try:
        device = llama_models.resolve_device(args.device)
        start = time.perf_counter()
        model, tokenizer = llama_models.load(args.model_dir, device=device, max_memory=args.max_memory)
    except (ValueError, llama_models.CheckpointError) as e:
        sys.exit(error_message(e, args.model_dir, MODEL_NAME))
    # Under torchrun, every process runs this same loop on its slice of the model.
    llama_models.print_on_first_process_only()
    print(f"loaded {args.model_dir} in {time.perf_counter() - start:.1f} s", file=sys.stderr)

    # Plain completion: <|begin_of_text|> then the text, nothing else.
    tokens = tokenizer.encode(args.prompt, bos=True, eos=False)
    max_new_tokens = min(args.max_new_tokens, model.params.max_seq_len - len(tokens))
    # One character (an emoji, a CJK ideograph) may span several tokens: feed the bytes of each
    # token to an incremental UTF-8 decoder, which prints a character once it is complete.
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    print(args.prompt, end="", flush=True)

    with torch.inference_mode():
        # Prefill: the whole prompt in one forward pass fills the KV cache for positions
        # 0 .. len(tokens)-1; the logits at the last position predict the first new token.
        logits = model(torch.tensor([tokens], device=device), start_pos=0)  # (1, len(tokens), vocab)
        for _ in range(max_new_tokens):
            next_token = int(logits[0, -1].argmax())  # greedy: the single most likely token
            if next_token in tokenizer.stop_tokens:
                break
            print(utf8.decode(tokenizer.decode_bytes([next_token])), end="", flush=True)
            tokens.append(next_token)
            # Decode step: only the new token goes in; the cache holds everything before it.
            logits = model(torch.tensor([[next_token]], device=device), start_pos=len(tokens) - 1)
    print(utf8.decode(b"", final=True))


if __name__ == "__main__":
    main()
