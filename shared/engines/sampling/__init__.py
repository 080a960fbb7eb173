"""Next-token sampling for a batch, as a pipeline of logits processors (see :mod:`.sampler`).

    raw logits -> logprobs (taken here, before anything below changes the logits)
      -> structured-output bitmask -> logit_bias -> min_tokens (stop ids banned)
      -> repetition / presence / frequency penalties
      -> greedy argmax | temperature -> min_p -> top_k -> top_p -> seeded draw

Each processor works on the whole step's ``[rows, vocab]`` tensor at once; Python loops run over
requests (to gather their parameters), never over the vocabulary.
"""

from shared.engines.sampling.logprobs import position_logprobs, prompt_position_logprobs
from shared.engines.sampling.sampler import Sampler, SampleResult, SamplerState

__all__ = ["SampleResult", "Sampler", "SamplerState", "position_logprobs", "prompt_position_logprobs"]
