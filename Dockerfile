FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml ./
COPY cdc_stream ./cdc_stream
RUN pip install . && rm -rf /src

COPY conf /etc/cdc-stream

RUN useradd --create-home --uid 10001 cdc
USER cdc
WORKDIR /home/cdc

EXPOSE 8000

CMD ["hypercorn", "cdc_stream.app:app", "--bind", "0.0.0.0:8000"]
