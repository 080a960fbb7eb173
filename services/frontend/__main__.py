from services.frontend.cli import app

app()
