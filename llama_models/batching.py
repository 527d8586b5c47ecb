"""Continuous batching: several conversations decoded together, one step for all of them.

To decode one token the model reads every one of its weights, and on a CPU (or a GPU, for a
few rows) that reading is most of a step's time: a step that feeds one new token to each of 4
rows reads the same weights once and costs little more than a step for 1 row. A server that
decodes its conversations together gets several times the tokens per second of one stream.
Continuous batching (Yu et al., "Orca", OSDI 2022) lets the batch change between steps: a new
conversation joins as soon as a row is free and a finished one leaves at once, instead of the
whole batch waiting for its longest member before the next batch starts.

The KV cache has max_batch_size rows, each of max_seq_len positions. Each row holds one
conversation, at its own position:

    cache row 0   A: prompt ............. reply so far|        next token goes to position 41
    cache row 1   B: prompt ...... reply|                      position 23
    cache row 2   (free)

A Batch keeps its conversations in rows 0..n-1, so that a decode step reads them as one block
of the cache (a view: nothing is copied each step). Its three moves:

    join(owner, prompt)  prefill the prompt alone into row n (model(prompt, 0, first_row=n)):
                         its last logits choose the conversation's first token
    step(tokens)         one decode step for rows 0..n-1: row i's token goes in at row i's own
                         position (model.decode_step(tokens, positions)); (n, V) logits come out
    leave(owner)         the last row moves into the leaver's row (its keys and values up to its
                         position), so that rows 0..n-2 are the busy ones again

A conversation's tokens are those it gets alone: its prompt is prefilled alone, and in a step
each row attends to its own cache row only, up to its own position (the model masks the rest).
"""

import torch


class Batch:
    """The conversations in the KV cache's rows: rows[i] is in cache row i, and the next token
    fed to it goes to position positions[i] (= the positions of its row written so far)."""

    def __init__(self, model):
        self.model = model
        self.rows: list = []  # whoever owns each busy row (serve.py: a request)
        self.positions: list[int] = []

    def free(self) -> int:
        """How many more conversations fit: the cache's rows not in use."""
        return self.model.params.max_batch_size - len(self.rows)

    def join(self, owner, prompt: list[int]) -> torch.Tensor:
        """Prefill `prompt` into the next free row, for `owner`; its logits for the first new token, (V,) float32."""
        row = len(self.rows)
        logits = self.model(torch.tensor([prompt], device=self.model.device), start_pos=0, first_row=row)
        self.rows.append(owner)
        self.positions.append(len(prompt))
        return logits[0, -1]

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed tokens[i] to row i at its position, all rows in one decode step; logits (n, V) float32."""
        fed = torch.tensor(tokens, device=self.model.device)[:, None]  # (n, 1)
        logits = self.model.decode_step(fed, self.positions)[:, -1]  # (n, V)
        self.positions = [position + 1 for position in self.positions]
        return logits

    def leave(self, owner) -> None:
        """Free owner's row: the last busy row moves into it."""
        row, last = self.rows.index(owner), len(self.rows) - 1
        if row != last:
            self.model.move_cache_row(last, row, end=self.positions[last])
            self.rows[row], self.positions[row] = self.rows[last], self.positions[last]
        self.rows.pop()
        self.positions.pop()
