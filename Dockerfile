FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY broker ./broker
COPY consumers ./consumers
RUN pip install --no-cache-dir .
ENV TOKENTEE_HOST=0.0.0.0 TOKENTEE_PORT=8000
EXPOSE 8000
CMD ["tokentee", "serve"]
