# syntax=docker/dockerfile:1
# vllm-router (PyPI `vllm-router`, a Rust load balancer for vLLM-style servers) for the Helm
# chart's optional router in front of the teacher pool (router.enabled; deploy/helm/opd).
#   docker build -f deploy/helm/router.Dockerfile -t opd-router deploy/helm
#   docker run opd-router --worker-urls http://teacher-0:8001 http://teacher-1:8001 --policy power_of_two
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m pip install --no-cache-dir "vllm-router==0.1.17" \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin opd

USER 10001:10001
EXPOSE 8001 29000

# /liveness answers once the router has started (after every worker answered /health).
HEALTHCHECK --interval=15s --timeout=10s --start-period=60m --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8001/liveness', timeout=8)"]

ENTRYPOINT ["vllm-router"]
CMD ["--help"]
