"""The student rollout service: samples trajectories with logprobs and takes weight updates.

Routes: `POST /v1/rollouts`, `POST /v1/weights/load`, `PUT /v1/weights`, `GET /v1/weights`,
`/v1/weights/broadcast` (`POST .../init`, `POST`, `GET`, `DELETE`: weights over a
torch.distributed group), plus the common probes and OpenAI-compatible routes. See
docs/rollout.md.
"""
