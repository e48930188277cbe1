# One image for every production process: `spendledger api | worker | sink | migrate`.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY ledger ./ledger
COPY ingest ./ingest
COPY processors ./processors
COPY spendledger ./spendledger
RUN pip install --no-cache-dir '.[server]'
USER nobody
ENTRYPOINT ["spendledger"]
