"""On-policy distillation: teacher and rollout services, and the trainer that ties them."""

__version__ = "0.1.0"
