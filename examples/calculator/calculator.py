"""The calculator task: a 3-digit product the policy cannot compute itself, so it has to call the tool, read the
result, then submit it. The environment follows TRL's ``environment_factory`` contract, so the same class runs in
``fusedrl train --environment`` and in TRL's ``GRPOTrainer(environment_factory=Calculator)``:

    <user> 347*829                                          the row: {"prompt": "347*829", "a": 347, "b": 829}
    <assistant> <tool_call>{"name": "multiply", "arguments": {"a": 347, "b": 829}}</tool_call>
    <tool> 287663
    <assistant> <tool_call>{"name": "answer", "arguments": {"value": 287663}}</tool_call>
    <tool> ok
    <assistant>                                             a turn without a tool call ends the episode

``get_reward`` is 1 when the submitted value is the product, else 0. This file imports nothing but the standard
library: ``fusedrl train --environment examples/calculator/calculator.py:Calculator`` loads it by path.
"""

from __future__ import annotations

# The chat template of the task's character tokenizer (make_data.py builds it): Hermes-style tool calls, written
# exactly as the episode runner parses them, so a demonstration's tool call is what the policy samples.
CHAT_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\ntools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}"
    '<tool_call>{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}</tool_call>'
    "{%- endfor %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# How a policy's turn is read back (transformers' response parser, which TRL's GRPOTrainer needs and fusedrl uses
# when the tokenizer has one): tool calls are JSON objects between <tool_call> tags, the rest is content.
RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "tool_calls": {"open": "<tool_call>", "close_pattern": r"</tool_call>\s*", "repeats": True, "content": "json",
                       "transform": {"type": "function", "function": "{content}"}},
        "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"},
    },
}  # fmt: skip
CHARS = '0123456789abcdefghijklmnopqrstuvwxyz *:,{}"\n'


class Calculator:
    """One episode of the task: the tools ``multiply`` and ``answer``; the first answer counts."""

    def reset(self, **row) -> None:
        self.product = int(row["a"]) * int(row["b"])
        self.submitted: int | None = None

    def multiply(self, a: int, b: int) -> int:
        """Multiply two integers.

        Args:
            a: The first factor.
            b: The second factor.
        """
        return int(a) * int(b)

    def answer(self, value: int) -> str:
        """Submit the final answer.

        Args:
            value: The answer to the question.
        """
        if self.submitted is not None:
            return "error: already answered"
        self.submitted = int(value)
        return "ok"

    def get_reward(self) -> float:
        return float(self.submitted == self.product)
