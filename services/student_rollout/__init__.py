"""The student rollout service: samples trajectories with logprobs and takes weight updates.

Routes: `POST /v1/rollouts`, `POST /v1/weights/load`, `PUT /v1/weights`, `GET /v1/weights`,
plus the common probes and OpenAI-compatible routes. See docs/rollout.md.
"""
