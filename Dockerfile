# The tokentee image: every service of docker-compose.yml but Redis and nginx runs it.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY broker ./broker
COPY consumers ./consumers
RUN pip install . && useradd --system --uid 10001 --no-create-home tokentee
USER tokentee
ENV TOKENTEE_HOST=0.0.0.0 TOKENTEE_PORT=8000
EXPOSE 8000
CMD ["tokentee", "serve"]
