from services.router.cli import app

app()
