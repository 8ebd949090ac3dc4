from qwen_mobile.cli import app

app(prog_name="qwen-mobile")
