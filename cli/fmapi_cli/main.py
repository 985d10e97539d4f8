def main():
    print("fmapi")
