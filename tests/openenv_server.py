"""An OpenEnv environment server for tests/test_openenv.py: ``python tests/openenv_server.py PORT`` serves, on
127.0.0.1, a two-turn text game whose reward is the length of the reset row's prompt plus the turns taken."""

from __future__ import annotations

import sys

import uvicorn
from openenv.core.env_server import Action, Environment, Observation, State, create_fastapi_app


class TextAction(Action):
    message: str


class TextObservation(Observation):
    text: str = ""


class TwoTurns(Environment):
    SUPPORTS_CONCURRENT_SESSIONS = True

    def reset(self, seed=None, episode_id=None, prompt: str = "", **kwargs) -> TextObservation:
        self._state, self.base = State(episode_id=episode_id), len(prompt)
        return TextObservation(text="")

    def step(self, action: TextAction, timeout_s=None, **kwargs) -> TextObservation:
        self._state.step_count += 1
        turns = self._state.step_count
        return TextObservation(text=" ok ", done=turns >= 2, reward=float(self.base + turns))

    @property
    def state(self) -> State:
        return self._state


if __name__ == "__main__":
    app = create_fastapi_app(TwoTurns, TextAction, TextObservation, max_concurrent_envs=64)
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
