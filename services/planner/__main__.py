from services.planner.cli import app

app()
