"""OpenEnv environments (``openenv-core``, a server speaking reset / step over a WebSocket) as text environments of
the episode runner: ``PPOTrainer(..., environment_factory=openenv_environment("http://127.0.0.1:8000"))``.

One client session per episode, as the episode runner makes one environment instance per rollout. The policy's turn
goes to the server as the action field ``action_field``; the observation's ``observation_field`` is the text
appended after it, ``done`` ends the episode and the last step's reward is the episode's (``get_reward``)."""

from __future__ import annotations

import json


def openenv_environment(base_url: str, *, action_field: str = "message", observation_field: str = "text"):
    """A text-environment class (TRL's ``environment_factory`` contract, ``step`` variant) for the OpenEnv server at
    ``base_url``."""
    try:
        from openenv.core import GenericEnvClient
    except ImportError as e:
        raise ImportError("openenv_environment needs openenv-core: pip install openenv-core") from e

    class OpenEnv:
        def reset(self, **row) -> str | None:
            self.close()
            self.client = GenericEnvClient(base_url=base_url).sync()
            # The row's JSON columns reach the server's reset (which keeps those its signature names).
            result = self.client.reset(**{k: v for k, v in row.items() if _is_json(v)})
            self.reward = float(result.reward or 0.0)
            return result.observation.get(observation_field) or None

        def step(self, completion: str) -> str | None:
            result = self.client.step({action_field: completion})
            self.reward = float(result.reward or 0.0)
            if result.done:
                self.close()
                return None
            return result.observation.get(observation_field, "")

        def get_reward(self) -> float:
            return self.reward

        def close(self) -> None:
            client, self.client = getattr(self, "client", None), None
            if client is not None:
                client.close()

        def __del__(self):  # an episode cut by a limit never saw done: its session ends with the instance
            try:
                self.close()
            except Exception:  # the server may already be gone at interpreter exit
                pass

    OpenEnv.__qualname__ = OpenEnv.__name__ = f"OpenEnv[{base_url}]"
    return OpenEnv


def _is_json(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
