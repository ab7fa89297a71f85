# One image for api, worker and migrate (docker-compose.yml). torch from PyPI is the CUDA
# build, so the same image runs GPU workers; pinned first so nothing pulls another build.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /srv
RUN pip install torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md alembic.ini ./
COPY models models
COPY experiments experiments
COPY app app
COPY worker worker
COPY migrations migrations
RUN pip install -e .
RUN useradd --create-home attrib && mkdir -p /data && chown attrib /data
USER attrib
ENV ATTRIB_DATA_DIR=/data
EXPOSE 8000
CMD ["attrib", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "0"]
