from services.decode.cli import app

app()
