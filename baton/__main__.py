from baton.cli import app

app()
