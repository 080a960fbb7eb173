from services.prefill.cli import app

app()
