# The image of the teamtrack services (bridge, dashboard, ingest, WebSockets gateway, device
# simulators).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Only the sources are copied: ./state holds generated secrets and must never enter an image.
COPY pyproject.toml README.md ./
COPY teamtrack ./teamtrack
COPY bridge ./bridge
COPY dashboard ./dashboard
COPY devices ./devices
COPY ingest ./ingest
COPY wsgate ./wsgate
COPY gateway ./gateway
COPY mosquitto ./mosquitto
# Editable, like the development install, so that teamtrack finds mosquitto/ next to it.
RUN pip install -e .

# The user is chosen at run time (docker-compose.yml) to match the owner of the mounted ./state.
CMD ["python", "-m", "dashboard"]
