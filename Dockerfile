# The safeswap worker image used by docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir /app
ENTRYPOINT ["safeswap"]
CMD ["worker"]
